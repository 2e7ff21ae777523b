/* fleecectl: the operator's command line. Each verb is one function; a
 * verb that talks to a mount does it through the control files only. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "fleecefs/verify.h"

/* Exit codes beside the verbs' own (fleecectl(8)). */
enum { EXIT_USAGE = 2 };

static void usage(FILE *f)
{
	fprintf(f, "usage: fleecectl verify TARGET...\n"
		   "       fleecectl --help | --version\n"
		   "verify: checks each backup (and its backing chain) against its manifests, without the source;\n"
		   "        exits 0 when all is good, 1 when damage is found, 2 when something cannot be checked\n");
}

static int cmd_verify(int argc, char **argv)
{
	enum verify_result worst = VERIFY_OK;

	if (argc < 1) {
		fprintf(stderr, "fleecectl: verify: which backup? (fleecectl verify TARGET...)\n");
		return EXIT_USAGE;
	}
	for (int i = 0; i < argc; i++) {
		enum verify_result r = verify_backup(argv[i], stdout, stderr);
		fflush(stdout);
		if (r == VERIFY_DAMAGED || (r == VERIFY_CANNOT && worst == VERIFY_OK))
			worst = r;
	}
	return (int)worst;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf("fleecectl %s\n", PACKAGE_VERSION);
		return 0;
	}
	if (!strcmp(argv[1], "verify"))
		return cmd_verify(argc - 2, argv + 2);
	fprintf(stderr, "fleecectl: %s: unknown command\n", argv[1]);
	usage(stderr);
	return EXIT_USAGE;
}
