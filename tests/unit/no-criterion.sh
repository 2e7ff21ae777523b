#!/bin/sh
# In `make check` when configure found no criterion: the unit tests cannot be
# built, and that is a failure, not a skip.
echo "FAIL: the unit tests need criterion: apt-get install libcriterion-dev, then configure again"
exit 99
