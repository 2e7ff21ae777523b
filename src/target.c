/* target: see include/fleecefs/target.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/target.h"

int target_finish(struct target *t) { return t->ops->finish(t); }
void target_abort(struct target *t) { t->ops->abort(t); }

void target_free(struct target *t)
{
	if (t)
		t->ops->free(t);
}

int fsync_parent_dir(const char *path)
{
	char *copy = strdup(path);
	int fd, rc = 0;

	if (!copy)
		return -ENOMEM;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	free(copy);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0 && errno != EINVAL)
		rc = -errno;
	close(fd);
	return rc;
}
