/* Unit tests for the control language parser (src/control.c). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fleecefs/control.h"

/* Criterion forks per test, so one global transaction per test is private. */
static struct ctl_txn txn;
static char err[1024];

static void free_txn(void)
{
	ctl_txn_free(&txn);
}

TestSuite(ctl, .fini = free_txn);

/* ctl_parse copies each line with strndup. Failing the Nth copy reaches its
 * out-of-memory path without disturbing the allocator criterion relies on. */
static _Thread_local unsigned strndup_fail_countdown;

char *strndup(const char *s, size_t n)
{
	if (strndup_fail_countdown && --strndup_fail_countdown == 0) {
		errno = ENOMEM;
		return NULL;
	}
	size_t len = strnlen(s, n);
	char *copy = malloc(len + 1);
	if (copy) {
		memcpy(copy, s, len);
		copy[len] = '\0';
	}
	return copy;
}

static int parse_len(const char *text, size_t len)
{
	ctl_txn_free(&txn);
	memset(err, 0, sizeof(err));
	return ctl_parse(text, len, &txn, err, sizeof(err));
}

static int parse(const char *text)
{
	return parse_len(text, strlen(text));
}

static const struct ctl_command *parse_one(const char *text)
{
	int rc = parse(text);
	cr_assert_eq(rc, 0, "'%s' rejected (%d): %s", text, rc, err);
	cr_assert_eq(txn.ncmds, 1, "'%s': %u commands", text, txn.ncmds);
	return &txn.cmds[0];
}

static const struct ctl_backup *parse_backup(const char *text)
{
	const struct ctl_command *cmd = parse_one(text);
	cr_assert_eq(cmd->verb, CTL_BACKUP, "'%s' is not a backup", text);
	return &cmd->u.backup;
}

/* The checks every rejection shares: the errno, nothing left in the
 * transaction, and a message "line N: VERB: ..." (just "line N: ..." when the
 * verb is not known yet) that holds every key word. */
static void check_rejected(int rc, int want_rc, const char *text, unsigned line, const char *verb,
			   const char *const *keys)
{
	char prefix[128];

	cr_assert_eq(rc, want_rc, "'%s': rc %d, want %d (message: %s)", text, rc, want_rc, err);
	cr_assert_eq(txn.ncmds, 0, "'%s': failed parse left commands behind", text);
	cr_assert_null(txn.cmds, "'%s': failed parse left cmds allocated", text);
	cr_assert_null(txn.storage, "'%s': failed parse left storage allocated", text);
	if (verb)
		snprintf(prefix, sizeof(prefix), "line %u: %s: ", line, verb);
	else
		snprintf(prefix, sizeof(prefix), "line %u: ", line);
	cr_assert(strncmp(err, prefix, strlen(prefix)) == 0, "'%s': message '%s' does not start with '%s'",
		  text, err, prefix);
	for (; *keys; keys++)
		cr_assert(strstr(err, *keys), "'%s': message '%s' lacks '%s'", text, err, *keys);
}

/* Rejects text alone, then again after a command, a blank line and a comment:
 * the error must move down exactly three lines. */
static void reject_keys(const char *text, unsigned line, const char *verb, const char *const *keys)
{
	static const char lead[] = "cancel job-1\n\n# comment\n";
	char *shifted;

	check_rejected(parse(text), -EINVAL, text, line, verb, keys);
	cr_assert(asprintf(&shifted, "%s%s", lead, text) > 0);
	check_rejected(parse(shifted), -EINVAL, shifted, line + 3, verb, keys);
	free(shifted);
}

#define reject(text, line, verb, ...) reject_keys(text, line, verb, (const char *const[]){ __VA_ARGS__, NULL })

/* Options appended to a valid backup line; the verb prefix is "backup". */
static void reject_backup_opts(const char *opts, const char *const *keys)
{
	char *text;

	cr_assert(asprintf(&text, "backup pool/vm.img /backup/vm.raw %s", opts) > 0);
	reject_keys(text, 1, "backup", keys);
	free(text);
}

#define reject_backup(opts, ...) reject_backup_opts(opts, (const char *const[]){ __VA_ARGS__, NULL })

/* ---- whole-text errors -------------------------------------------------- */

Test(ctl, empty_write)
{
	static const char *const texts[] = { "", "\n", "\n\n\n", "   \t \r\n", "# only a comment", "# a\n\n  # b\n" };

	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		int rc = parse(texts[i]);
		cr_assert_eq(rc, -EINVAL, "text %zu: rc %d", i, rc);
		cr_assert(strstr(err, "no command"), "text %zu: message '%s'", i, err);
		cr_assert_eq(txn.ncmds, 0);
		cr_assert_null(txn.cmds);
	}
}

Test(ctl, nul_byte_rejected)
{
	static const char text[] = "cancel job-1\ncancel jo\0b-2\n";
	int rc = parse_len(text, sizeof(text) - 1);

	cr_assert_eq(rc, -EINVAL, "rc %d", rc);
	cr_assert(strstr(err, "NUL"), "message '%s'", err);
	cr_assert_eq(txn.ncmds, 0);
	cr_assert_null(txn.cmds);
}

/* SPEC section 3: an error says "what and where"; control.h: "line N: ...". */
Test(ctl, nul_byte_error_names_line)
{
	static const char text[] = "cancel job-1\ncancel jo\0b-2\n";

	cr_assert_eq(parse_len(text, sizeof(text) - 1), -EINVAL);
	cr_assert(strncmp(err, "line 2: ", 8) == 0, "message '%s' does not name line 2", err);
}

Test(ctl, nul_byte_after_len_is_ignored)
{
	static const char text[] = "cancel job-1\0garbage";

	cr_assert_eq(parse_len(text, 12), 0, "%s", err);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "job-1");
}

Test(ctl, len_bounds_the_text)
{
	/* Nothing past len may leak into the last word. */
	cr_assert_eq(parse_len("cancel job-1trailing", 12), 0, "%s", err);
	cr_assert_eq(txn.ncmds, 1);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "job-1");
}

/* A FUSE write buffer is not NUL-terminated: a text whose last line is blank
 * must not be read past its end. The page after the text is inaccessible. */
Test(ctl, unterminated_text_not_read_past_len)
{
	static const char text[] = "cancel job-1\n \t ";
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	cr_assert_neq(map, MAP_FAILED);
	cr_assert_eq(mprotect(map + page, page, PROT_NONE), 0);
	char *copy = map + page - (sizeof(text) - 1);
	memcpy(copy, text, sizeof(text) - 1);
	cr_assert_eq(parse_len(copy, sizeof(text) - 1), 0, "%s", err);
	cr_assert_eq(txn.ncmds, 1);
	munmap(map, 2 * page);
}

Test(ctl, unterminated_command_at_end_of_buffer)
{
	static const char text[] = "# c\ncancel job-1";
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	cr_assert_neq(map, MAP_FAILED);
	cr_assert_eq(mprotect(map + page, page, PROT_NONE), 0);
	char *copy = map + page - (sizeof(text) - 1);
	memcpy(copy, text, sizeof(text) - 1);
	cr_assert_eq(parse_len(copy, sizeof(text) - 1), 0, "%s", err);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "job-1");
	cr_assert_eq(txn.cmds[0].line, 2);
	munmap(map, 2 * page);
}

static char *line_of_length(const char *command, size_t len)
{
	char *line = malloc(len + 2);
	cr_assert_not_null(line);
	memset(line, ' ', len);
	memcpy(line, command, strlen(command));
	line[len] = '\n';
	line[len + 1] = '\0';
	return line;
}

Test(ctl, line_of_max_length_accepted)
{
	char *line = line_of_length("cancel job-1", CTL_MAX_LINE);

	cr_assert_eq(parse(line), 0, "%s", err);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "job-1");
	free(line);
}

Test(ctl, too_long_line)
{
	char *line = line_of_length("cancel job-1", CTL_MAX_LINE + 1);
	char *text;

	reject(line, 1, NULL, "longer than 4096");
	cr_assert(asprintf(&text, "cancel job-1\n%s", line) > 0);
	check_rejected(parse(text), -EINVAL, "long second line", 2, NULL, (const char *const[]){ "longer", NULL });
	free(text);
	free(line);
}

Test(ctl, out_of_memory)
{
	/* The third line's copy fails: line 1 is copied, line 2 is a comment. */
	strndup_fail_countdown = 2;
	int rc = parse("cancel job-1\n# c\ncancel job-2\n");
	strndup_fail_countdown = 0;
	check_rejected(rc, -ENOMEM, "third line", 3, NULL, (const char *const[]){ "out of memory", NULL });

	strndup_fail_countdown = 1;
	rc = parse("cancel job-1\n");
	strndup_fail_countdown = 0;
	check_rejected(rc, -ENOMEM, "first line", 1, NULL, (const char *const[]){ "out of memory", NULL });
}

Test(ctl, errors_fit_a_small_buffer)
{
	char small[16];

	memset(small, 'x', sizeof(small));
	int rc = ctl_parse("frob", 4, &txn, small, sizeof(small));
	cr_assert_eq(rc, -EINVAL);
	cr_assert_eq(strlen(small), sizeof(small) - 1, "message not truncated to the buffer");
	cr_assert(strncmp(small, "line 1: ", 8) == 0, "'%s'", small);
	cr_assert_eq(ctl_parse("frob", 4, &txn, NULL, 0), -EINVAL);
}

/* ---- words and lines ---------------------------------------------------- */

Test(ctl, unknown_command)
{
	reject("frob job-1", 1, NULL, "unknown command 'frob'", "backup");
	reject("Backup a.img /b.raw", 1, NULL, "unknown command 'Backup'");
	reject("\"\" job-1", 1, NULL, "unknown command ''");
	reject("\"cancel job-1\"", 1, NULL, "unknown command 'cancel job-1'");
}

Test(ctl, unterminated_quote)
{
	reject("cancel \"job-1", 1, NULL, "unterminated quote");
	reject("backup a.img \"/b/x.raw", 1, NULL, "unterminated quote");
	/* An escaped quote does not close the quote. */
	reject("cancel \"job-1\\\"", 1, NULL, "unterminated quote");
}

static char *words_line(const char *verb, unsigned nwords)
{
	size_t cap = strlen(verb) + 2 * nwords + 2;
	char *line = malloc(cap);
	cr_assert_not_null(line);
	strcpy(line, verb);
	for (unsigned i = 1; i < nwords; i++)
		strcat(line, " x");
	return line;
}

Test(ctl, too_many_words)
{
	char *line = words_line("cancel", 81);

	reject(line, 1, NULL, "too many words", "80");
	free(line);
	/* 80 words still split; the verb's own check is what fails. */
	line = words_line("cancel", 80);
	reject(line, 1, "cancel", "usage: cancel ID");
	free(line);
}

Test(ctl, quoting)
{
	const struct ctl_backup *b = parse_backup("backup \"my pool/my vm.img\" \"/backups/my vm.raw\" id=\"n1\"");

	cr_assert_str_eq(b->image, "my pool/my vm.img");
	cr_assert_str_eq(b->target, "/backups/my vm.raw");
	cr_assert_str_eq(b->id, "n1");

	/* \" and \\ are escapes inside quotes; any other backslash is kept. */
	b = parse_backup("backup vm.img \"/b/q\\\"uote\\\\d\\n.raw\"");
	cr_assert_str_eq(b->target, "/b/q\"uote\\d\\n.raw");

	/* Quotes may open and close inside a word. */
	b = parse_backup("backup vm.img /b/\"x y\".raw backing=\"/b/p q\".qcow2 format=qcow2 sync=incremental bitmap=b");
	cr_assert_str_eq(b->target, "/b/x y.raw");
	cr_assert_str_eq(b->backing, "/b/p q.qcow2");

	/* Outside quotes a backslash is an ordinary character. */
	b = parse_backup("backup vm.img /b/a\\b.raw");
	cr_assert_str_eq(b->target, "/b/a\\b.raw");

	/* A quoted '#' at the start is a word, not a comment. */
	reject("\"#\" job-1", 1, NULL, "unknown command '#'");
}

Test(ctl, blanks_tabs_and_crlf)
{
	const struct ctl_command *cmd = parse_one("  \t cancel \t  job-1 \t\r\n");

	cr_assert_eq(cmd->verb, CTL_CANCEL);
	cr_assert_str_eq(cmd->u.job.id, "job-1");
	cr_assert_eq(parse("cancel a\r\npause b\r\n"), 0, "%s", err);
	cr_assert_eq(txn.ncmds, 2);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "a");
	cr_assert_str_eq(txn.cmds[1].u.job.id, "b");
}

Test(ctl, comments_and_blank_lines)
{
	int rc = parse("# nightly\n\n   \n\t# indented comment\n#cancel job-0\ncancel job-1\n\n# trailing\n");

	cr_assert_eq(rc, 0, "%s", err);
	cr_assert_eq(txn.ncmds, 1);
	cr_assert_eq(txn.cmds[0].verb, CTL_CANCEL);
	cr_assert_eq(txn.cmds[0].line, 6);
	cr_assert_str_eq(txn.cmds[0].u.job.id, "job-1");
}

Test(ctl, multi_line_transaction)
{
	int rc = parse("backup a.img /b/a.raw id=a group=g\n"
		       "\n"
		       "backup pool/b.img /b/b.qcow2 id=b group=g\n"
		       "snapshot s1 a.img pool/b.img\n"
		       "bitmap add a.img daily");

	cr_assert_eq(rc, 0, "%s", err);
	cr_assert_eq(txn.ncmds, 4);
	cr_assert_eq(txn.cmds[0].verb, CTL_BACKUP);
	cr_assert_eq(txn.cmds[0].line, 1);
	cr_assert_str_eq(txn.cmds[0].u.backup.image, "a.img");
	cr_assert_str_eq(txn.cmds[0].u.backup.id, "a");
	cr_assert_str_eq(txn.cmds[0].u.backup.group, "g");
	cr_assert_eq(txn.cmds[1].verb, CTL_BACKUP);
	cr_assert_eq(txn.cmds[1].line, 3);
	cr_assert_str_eq(txn.cmds[1].u.backup.image, "pool/b.img");
	cr_assert_eq(txn.cmds[1].u.backup.format, FORMAT_QCOW2);
	cr_assert_eq(txn.cmds[2].verb, CTL_SNAPSHOT);
	cr_assert_eq(txn.cmds[2].line, 4);
	cr_assert_eq(txn.cmds[2].u.snapshot.nimages, 2);
	cr_assert_str_eq(txn.cmds[2].u.snapshot.images[1], "pool/b.img");
	cr_assert_eq(txn.cmds[3].verb, CTL_BITMAP);
	cr_assert_eq(txn.cmds[3].line, 5);
	cr_assert_str_eq(txn.cmds[3].u.bitmap.name, "daily");
}

Test(ctl, one_bad_line_rejects_the_transaction)
{
	int rc = parse("backup a.img /b/a.raw\nbackup b.img /b/b.raw sync=weekly\nsnapshot s a.img\n");

	check_rejected(rc, -EINVAL, "second of three", 2, "backup", (const char *const[]){ "sync=weekly", NULL });
}

Test(ctl, free_is_idempotent)
{
	parse_one("cancel job-1");
	ctl_txn_free(&txn);
	cr_assert_eq(txn.ncmds, 0);
	cr_assert_null(txn.cmds);
	cr_assert_null(txn.storage);
	ctl_txn_free(&txn);
}

/* ---- names and paths ---------------------------------------------------- */

Test(ctl, image_paths)
{
	static const char *const good[] = { "vm.img", "pool/vm.img", "a/b/c/d", "..a", "a..", "...", ".hidden",
					    "a/.b/c", "-x", "x y" };
	static const char *const bad[] = { "", "/vm.img", "/", ".", "..", "./vm.img", "../vm.img", "a/./b",
					   "a/../b", "a/..", "a/.", "a//b", "a/", "pool/", "//a" };

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		cr_assert(ctl_image_path_is_valid(good[i]), "'%s' refused", good[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert(!ctl_image_path_is_valid(bad[i]), "'%s' accepted", bad[i]);
	cr_assert(!ctl_image_path_is_valid(NULL));

	char *longpath = malloc(5000);
	memset(longpath, 'a', 4999);
	longpath[4999] = '\0';
	cr_assert(!ctl_image_path_is_valid(longpath), "a path of PATH_MAX or more accepted");
	free(longpath);
}

Test(ctl, image_argument_checked)
{
	reject("backup /vm.img /b/vm.raw", 1, "backup", "IMAGE '/vm.img'", "relative");
	reject("backup ../vm.img /b/vm.raw", 1, "backup", "IMAGE '../vm.img'", "'..'");
	reject("backup a/./b /b/vm.raw", 1, "backup", "IMAGE 'a/./b'");
	reject("backup a//b /b/vm.raw", 1, "backup", "IMAGE 'a//b'", "empty");
	reject("backup pool/ /b/vm.raw", 1, "backup", "IMAGE 'pool/'");
	reject("backup \"\" /b/vm.raw", 1, "backup", "IMAGE ''");
	const struct ctl_backup *b = parse_backup("backup pool/sub/vm.img /b/vm.raw");
	cr_assert_str_eq(b->image, "pool/sub/vm.img");
}

Test(ctl, target_argument_checked)
{
	reject("backup vm.img vm.raw", 1, "backup", "TARGET 'vm.raw'", "absolute");
	reject("backup vm.img ./vm.raw", 1, "backup", "TARGET './vm.raw'", "absolute");
	reject("backup vm.img /", 1, "backup", "TARGET '/'");
	reject("backup vm.img /backups/", 1, "backup", "TARGET '/backups/'");
	reject("backup vm.img \"\"", 1, "backup", "TARGET ''");
	const struct ctl_backup *b = parse_backup("backup vm.img /x");
	cr_assert_str_eq(b->target, "/x");
	b = parse_backup("backup vm.img /a/b/c/vm.raw");
	cr_assert_str_eq(b->target, "/a/b/c/vm.raw");
}

Test(ctl, names)
{
	char name65[66], name64[65], text[200];

	memset(name65, 'n', 65);
	name65[65] = '\0';
	memset(name64, 'n', 64);
	name64[64] = '\0';

	static const char *const good[] = { "a", "job-1", "A.b_c-D", "0", "-", "_x", "a..b", "x." };
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(text, sizeof(text), "cancel %s", good[i]);
		cr_assert_str_eq(parse_one(text)->u.job.id, good[i]);
	}
	snprintf(text, sizeof(text), "cancel %s", name64);
	cr_assert_str_eq(parse_one(text)->u.job.id, name64);

	static const char *const bad[] = { ".a", ".", "..", "a/b", "a:b", "a+b", "\"a b\"", "\"\"", "caf\xc3\xa9" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(text, sizeof(text), "cancel %s", bad[i]);
		reject(text, 1, "cancel", "job id '", "1 to 64");
	}
	snprintf(text, sizeof(text), "cancel %s", name65);
	reject(text, 1, "cancel", "job id 'nnnn", "1 to 64");
}

/* ---- backup ------------------------------------------------------------- */

Test(ctl, backup_defaults)
{
	const struct ctl_command *cmd = parse_one("backup pool/vm.img /backup/vm.raw");
	const struct ctl_backup *b = &cmd->u.backup;

	cr_assert_eq(cmd->verb, CTL_BACKUP);
	cr_assert_eq(cmd->line, 1);
	cr_assert_str_eq(b->image, "pool/vm.img");
	cr_assert_str_eq(b->target, "/backup/vm.raw");
	cr_assert_eq(b->sync, SYNC_FULL);
	cr_assert_eq(b->format, FORMAT_RAW);
	cr_assert_null(b->bitmap);
	cr_assert_eq(b->bitmap_mode, BITMAP_MODE_ON_SUCCESS);
	cr_assert(!b->bitmap_mode_given);
	cr_assert_null(b->backing);
	cr_assert_eq(b->compress, COMPRESS_NONE);
	cr_assert_eq(b->compress_level, 0);
	cr_assert(b->checksum, "checksum must default to xxh3");
	cr_assert_eq(b->speed, 0);
	cr_assert_eq(b->on_source_error, POLICY_REPORT);
	cr_assert_eq(b->on_target_error, POLICY_REPORT);
	cr_assert_eq(b->on_cbw_error, CBW_BREAK_SNAPSHOT);
	cr_assert_eq(b->cbw_timeout_ms, 0);
	cr_assert(!b->fleecing);
	cr_assert_eq(b->max_store, 0);
	cr_assert_null(b->id);
	cr_assert_null(b->group);
}

Test(ctl, backup_format_default_from_suffix)
{
	cr_assert_eq(parse_backup("backup vm.img /b/vm.qcow2")->format, FORMAT_QCOW2);
	cr_assert_eq(parse_backup("backup vm.img /b/vm.raw")->format, FORMAT_RAW);
	cr_assert_eq(parse_backup("backup vm.img /b/vm.img")->format, FORMAT_RAW);
	cr_assert_eq(parse_backup("backup vm.img /b/vm.qcow2.part")->format, FORMAT_RAW);
	cr_assert_eq(parse_backup("backup vm.img /b/qcow2")->format, FORMAT_RAW);
	cr_assert_eq(parse_backup("backup vm.img /b/vmqcow2")->format, FORMAT_RAW);
	/* An explicit format wins over the suffix. */
	cr_assert_eq(parse_backup("backup vm.img /b/vm.qcow2 format=raw")->format, FORMAT_RAW);
	cr_assert_eq(parse_backup("backup vm.img /b/vm.raw format=qcow2")->format, FORMAT_QCOW2);
}

Test(ctl, backup_every_option)
{
	const struct ctl_backup *b = parse_backup(
		"backup vm.img /b/inc.qcow2 sync=incremental format=qcow2 bitmap=daily bitmap-mode=always "
		"backing=/b/full.qcow2 compress=zstd:7 checksum=none speed=10M on-source-error=ignore "
		"on-target-error=stop on-cbw-error=break-guest-write cbw-timeout=250 fleecing=on "
		"max-store=2G id=nightly-1 group=g.1");

	cr_assert_eq(b->sync, SYNC_INCREMENTAL);
	cr_assert_eq(b->format, FORMAT_QCOW2);
	cr_assert_str_eq(b->bitmap, "daily");
	cr_assert_eq(b->bitmap_mode, BITMAP_MODE_ALWAYS);
	cr_assert(b->bitmap_mode_given);
	cr_assert_str_eq(b->backing, "/b/full.qcow2");
	cr_assert_eq(b->compress, COMPRESS_ZSTD);
	cr_assert_eq(b->compress_level, 7);
	cr_assert(!b->checksum);
	cr_assert_eq(b->speed, 10ull << 20);
	cr_assert_eq(b->on_source_error, POLICY_IGNORE);
	cr_assert_eq(b->on_target_error, POLICY_STOP);
	cr_assert_eq(b->on_cbw_error, CBW_BREAK_GUEST_WRITE);
	cr_assert_eq(b->cbw_timeout_ms, 250);
	cr_assert(b->fleecing);
	cr_assert_eq(b->max_store, 2ull << 30);
	cr_assert_str_eq(b->id, "nightly-1");
	cr_assert_str_eq(b->group, "g.1");
}

Test(ctl, backup_option_order_is_free)
{
	const struct ctl_backup *b = parse_backup("backup vm.img /b/x.raw id=z bitmap=bm sync=incremental");

	cr_assert_eq(b->sync, SYNC_INCREMENTAL);
	cr_assert_str_eq(b->bitmap, "bm");
	cr_assert_str_eq(b->id, "z");
}

Test(ctl, backup_sync_values)
{
	cr_assert_eq(parse_backup("backup vm.img /b/x sync=full")->sync, SYNC_FULL);
	cr_assert_eq(parse_backup("backup vm.img /b/x sync=top")->sync, SYNC_TOP);
	cr_assert_eq(parse_backup("backup vm.img /b/x sync=none")->sync, SYNC_NONE);
	cr_assert_eq(parse_backup("backup vm.img /b/x sync=incremental bitmap=b")->sync, SYNC_INCREMENTAL);
	/* full and top with a bitmap start a new chain. */
	const struct ctl_backup *b = parse_backup("backup vm.img /b/x sync=top bitmap=b bitmap-mode=never");
	cr_assert_eq(b->sync, SYNC_TOP);
	cr_assert_str_eq(b->bitmap, "b");
	cr_assert_eq(b->bitmap_mode, BITMAP_MODE_NEVER);
	/* sync=incremental format=raw updates an earlier full backup in place. */
	b = parse_backup("backup vm.img /b/x.raw sync=incremental bitmap=b format=raw");
	cr_assert_eq(b->format, FORMAT_RAW);
}

Test(ctl, backup_choice_values)
{
	cr_assert_eq(parse_backup("backup v /t bitmap=b bitmap-mode=on-success")->bitmap_mode, BITMAP_MODE_ON_SUCCESS);
	cr_assert(parse_backup("backup v /t bitmap=b bitmap-mode=on-success")->bitmap_mode_given);
	cr_assert_eq(parse_backup("backup v /t bitmap=b bitmap-mode=always")->bitmap_mode, BITMAP_MODE_ALWAYS);
	cr_assert_eq(parse_backup("backup v /t bitmap=b bitmap-mode=never")->bitmap_mode, BITMAP_MODE_NEVER);
	cr_assert(parse_backup("backup v /t checksum=xxh3")->checksum);
	cr_assert(!parse_backup("backup v /t checksum=none")->checksum);
	cr_assert_eq(parse_backup("backup v /t on-source-error=report")->on_source_error, POLICY_REPORT);
	cr_assert_eq(parse_backup("backup v /t on-source-error=ignore")->on_source_error, POLICY_IGNORE);
	cr_assert_eq(parse_backup("backup v /t on-source-error=stop")->on_source_error, POLICY_STOP);
	cr_assert_eq(parse_backup("backup v /t on-target-error=report")->on_target_error, POLICY_REPORT);
	cr_assert_eq(parse_backup("backup v /t on-target-error=ignore")->on_target_error, POLICY_IGNORE);
	cr_assert_eq(parse_backup("backup v /t on-target-error=stop")->on_target_error, POLICY_STOP);
	cr_assert_eq(parse_backup("backup v /t on-cbw-error=break-snapshot")->on_cbw_error, CBW_BREAK_SNAPSHOT);
	cr_assert_eq(parse_backup("backup v /t on-cbw-error=break-guest-write")->on_cbw_error, CBW_BREAK_GUEST_WRITE);
	cr_assert(parse_backup("backup v /t fleecing=on")->fleecing);
	cr_assert(!parse_backup("backup v /t fleecing=off")->fleecing);
	cr_assert(!parse_backup("backup v /t")->reflink, "reflink=off by default");
	cr_assert(parse_backup("backup v /t reflink=auto")->reflink);
	cr_assert(!parse_backup("backup v /t reflink=off")->reflink);
	cr_assert_eq(parse_backup("backup v /t cbw-timeout=0")->cbw_timeout_ms, 0);
	cr_assert_eq(parse_backup("backup v /t cbw-timeout=18446744073709551615")->cbw_timeout_ms, UINT64_MAX);
}

Test(ctl, backup_compress_values)
{
	const struct ctl_backup *b = parse_backup("backup v /t.qcow2 compress=none");
	cr_assert_eq(b->compress, COMPRESS_NONE);
	b = parse_backup("backup v /t.qcow2 compress=zstd");
	cr_assert_eq(b->compress, COMPRESS_ZSTD);
	cr_assert_eq(b->compress_level, 0);
	b = parse_backup("backup v /t.qcow2 compress=zstd:1");
	cr_assert_eq(b->compress_level, 1);
	b = parse_backup("backup v /t.qcow2 compress=zstd:19");
	cr_assert_eq(b->compress, COMPRESS_ZSTD);
	cr_assert_eq(b->compress_level, 19);
	/* compress=none is no compression, so a raw target takes it. */
	b = parse_backup("backup v /t.raw compress=none");
	cr_assert_eq(b->compress, COMPRESS_NONE);
}

Test(ctl, sizes_with_suffixes)
{
	static const struct {
		const char *text;
		uint64_t value;
	} sizes[] = {
		{ "0", 0 }, { "1", 1 }, { "512", 512 }, { "64K", 64ull << 10 }, { "64k", 64ull << 10 },
		{ "1M", 1ull << 20 }, { "3m", 3ull << 20 }, { "2G", 2ull << 30 }, { "5g", 5ull << 30 },
		{ "1T", 1ull << 40 }, { "7t", 7ull << 40 }, { "16777215T", 16777215ull << 40 },
		{ "18446744073709551615", UINT64_MAX },
	};
	char text[200];

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		snprintf(text, sizeof(text), "backup v /t speed=%s", sizes[i].text);
		cr_assert_eq(parse_backup(text)->speed, sizes[i].value, "%s", text);
		snprintf(text, sizeof(text), "backup v /t fleecing=on max-store=%s", sizes[i].text);
		cr_assert_eq(parse_backup(text)->max_store, sizes[i].value, "%s", text);
		snprintf(text, sizeof(text), "mirror v /t speed=%s", sizes[i].text);
		cr_assert_eq(parse_one(text)->u.mirror.speed, sizes[i].value, "%s", text);
		snprintf(text, sizeof(text), "snapshot s v max-store=%s", sizes[i].text);
		cr_assert_eq(parse_one(text)->u.snapshot.max_store, sizes[i].value, "%s", text);
		snprintf(text, sizeof(text), "set j speed=%s", sizes[i].text);
		cr_assert_eq(parse_one(text)->u.job.speed, sizes[i].value, "%s", text);
	}
}

Test(ctl, backup_usage)
{
	reject("backup", 1, "backup", "usage: backup IMAGE TARGET");
	reject("backup vm.img", 1, "backup", "usage: backup IMAGE TARGET");
}

Test(ctl, backup_option_syntax)
{
	reject_backup("junk", "unexpected argument 'junk'", "key=value", "sync");
	reject_backup("colour=red", "unknown option 'colour'", "known:", "sync", "group");
	reject_backup("Sync=full", "unknown option 'Sync'");
	reject_backup("=full", "unknown option ''");
	reject_backup("sync=", "option sync has an empty value");
	reject_backup("id=\"\"", "option id has an empty value");
}

Test(ctl, backup_duplicate_options)
{
	static const char *const opts[] = {
		"sync=full", "format=raw", "bitmap=b", "bitmap-mode=always", "backing=/p.qcow2", "compress=none",
		"checksum=none", "speed=1", "on-source-error=report", "on-target-error=stop",
		"on-cbw-error=break-snapshot", "cbw-timeout=1", "fleecing=off", "max-store=1", "id=x", "group=g",
		"reflink=off",
	};
	char text[200], key[64];

	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		snprintf(text, sizeof(text), "%s %s", opts[i], opts[i]);
		snprintf(key, sizeof(key), "option %.*s given twice", (int)strcspn(opts[i], "="), opts[i]);
		reject_backup(text, key);
	}
	/* Even with different values. */
	reject_backup("sync=full sync=top", "option sync given twice");
}

Test(ctl, backup_bad_values)
{
	reject_backup("sync=weekly", "sync=weekly", "expected one of full, top, incremental, none");
	reject_backup("sync=FULL", "sync=FULL", "expected one of");
	reject_backup("format=vmdk", "format=vmdk", "expected one of raw, qcow2");
	reject_backup("bitmap=.hidden", "bitmap '.hidden'", "1 to 64");
	reject_backup("bitmap=a/b", "bitmap 'a/b'", "1 to 64");
	reject_backup("bitmap=b bitmap-mode=sometimes", "bitmap-mode=sometimes",
		      "expected one of on-success, always, never");
	reject_backup("format=qcow2 sync=incremental bitmap=b backing=prev.qcow2", "backing 'prev.qcow2'", "absolute");
	reject_backup("format=qcow2 sync=incremental bitmap=b backing=/b/", "backing '/b/'", "absolute");
	reject_backup("checksum=md5", "checksum=md5", "expected one of xxh3, none");
	reject_backup("speed=fast", "speed=fast", "not a size");
	reject_backup("speed=1.5M", "speed=1.5M", "not a size");
	reject_backup("speed=1MB", "speed=1MB", "not a size");
	reject_backup("speed=-1", "speed=-1", "not a size");
	reject_backup("speed=20000000T", "speed=20000000T", "too large");
	reject_backup("speed=18446744073709551616", "speed=18446744073709551616", "too large");
	reject_backup("on-source-error=retry", "on-source-error=retry", "expected one of report, ignore, stop");
	reject_backup("on-target-error=panic", "on-target-error=panic", "expected one of report, ignore, stop");
	reject_backup("on-cbw-error=ignore", "on-cbw-error=ignore",
		      "expected one of break-snapshot, break-guest-write");
	reject_backup("cbw-timeout=5s", "cbw-timeout=5s", "milliseconds");
	reject_backup("cbw-timeout=-1", "cbw-timeout=-1", "milliseconds");
	reject_backup("cbw-timeout=18446744073709551616", "cbw-timeout=18446744073709551616", "milliseconds");
	reject_backup("fleecing=yes", "fleecing=yes", "expected one of on, off");
	reject_backup("reflink=on", "reflink=on", "expected one of auto, off");
	reject_backup("fleecing=on max-store=lots", "max-store=lots", "not a size");
	reject_backup("id=.x", "id '.x'", "1 to 64");
	reject_backup("id=\"a b\"", "id 'a b'", "1 to 64");
	reject_backup("group=.g", "group '.g'", "1 to 64");
	reject_backup("group=g/h", "group 'g/h'", "1 to 64");
}

/* A long non-numeric value is a syntax error like a short one, not an
 * overflow. */
Test(ctl, backup_long_garbage_size_is_not_too_large)
{
	reject_backup("speed=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "speed=xxxx", "not a size");
}

Test(ctl, backup_compress_bad_values)
{
	static const char *const values[] = { "lz4", "zstd:0", "zstd:20", "zstd:", "zstd:x", "zstd:-1", "zstd:1.5",
					      "zstd:99999999999999999999999", "zstd1", "ZSTD" };
	char opts[128], key[128];

	for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
		snprintf(opts, sizeof(opts), "format=qcow2 compress=%s", values[i]);
		snprintf(key, sizeof(key), "compress=%s:", values[i]);
		reject_backup(opts, key, "zstd:LEVEL", "1 to 19");
	}
}

Test(ctl, backup_option_combinations)
{
	reject_backup("sync=incremental", "sync=incremental needs bitmap=NAME");
	reject_backup("sync=incremental format=qcow2", "sync=incremental needs bitmap");
	reject_backup("bitmap-mode=never", "bitmap-mode needs bitmap=NAME");
	reject_backup("bitmap-mode=on-success sync=top", "bitmap-mode needs bitmap");
	reject_backup("sync=none bitmap=b", "sync=none cannot use a bitmap");
	reject_backup("compress=zstd", "compress needs format=qcow2");
	reject_backup("compress=zstd:3 format=raw", "compress needs format=qcow2");
	reject("backup vm.img /b/vm.qcow2 format=raw compress=zstd", 1, "backup", "compress needs format=qcow2");
	reject_backup("backing=/b/prev.raw", "backing= applies only to sync=incremental with format=qcow2");
	reject_backup("format=qcow2 bitmap=b backing=/b/p.qcow2", "backing= applies only to sync=incremental");
	reject_backup("sync=incremental bitmap=b backing=/b/p.raw", "backing= applies only", "format=qcow2");
	reject_backup("max-store=1G", "max-store applies only with fleecing=on");
	reject_backup("max-store=1G fleecing=off", "max-store applies only with fleecing=on");
	reject_backup("sync=none fleecing=on", "fleecing=on needs a background copy", "sync=none");

	/* The legal neighbours of those combinations. */
	const struct ctl_backup *b = parse_backup("backup v /b/inc.qcow2 sync=incremental bitmap=b backing=/b/f.qcow2");
	cr_assert_str_eq(b->backing, "/b/f.qcow2");
	b = parse_backup("backup v /b/x.qcow2 compress=zstd");
	cr_assert_eq(b->compress, COMPRESS_ZSTD);
	b = parse_backup("backup v /b/x sync=top fleecing=on max-store=1G");
	cr_assert_eq(b->max_store, 1ull << 30);
	b = parse_backup("backup v /b/x sync=none");
	cr_assert_eq(b->sync, SYNC_NONE);
	cr_assert(!b->fleecing);
}

/* ---- mirror ------------------------------------------------------------- */

Test(ctl, mirror)
{
	const struct ctl_command *cmd = parse_one("mirror pool/vm.img /new/vm.img");
	const struct ctl_mirror *m = &cmd->u.mirror;

	cr_assert_eq(cmd->verb, CTL_MIRROR);
	cr_assert_str_eq(m->image, "pool/vm.img");
	cr_assert_str_eq(m->target, "/new/vm.img");
	cr_assert_eq(m->sync, SYNC_FULL);
	cr_assert_eq(m->speed, 0);
	cr_assert_null(m->id);
	cr_assert_eq(m->copy_mode, COPY_MODE_BACKGROUND);

	m = &parse_one("mirror vm.img /n sync=top speed=64M id=mv copy-mode=write-blocking")->u.mirror;
	cr_assert_eq(m->sync, SYNC_TOP);
	cr_assert_eq(m->speed, 64ull << 20);
	cr_assert_str_eq(m->id, "mv");
	cr_assert_eq(m->copy_mode, COPY_MODE_WRITE_BLOCKING);
	m = &parse_one("mirror vm.img /n sync=full copy-mode=background")->u.mirror;
	cr_assert_eq(m->sync, SYNC_FULL);
	cr_assert_eq(m->copy_mode, COPY_MODE_BACKGROUND);
	cr_assert_eq(m->granularity, 0, "the daemon's cluster size unless given");
	cr_assert_eq(m->on_source_error, POLICY_REPORT);
	cr_assert_eq(m->on_target_error, POLICY_REPORT);
	m = &parse_one("mirror vm.img /n granularity=4K on-source-error=ignore on-target-error=stop")->u.mirror;
	cr_assert_eq(m->granularity, 4096);
	cr_assert_eq(m->on_source_error, POLICY_IGNORE);
	cr_assert_eq(m->on_target_error, POLICY_STOP);
	cr_assert_eq(parse_one("mirror vm.img /n granularity=64M")->u.mirror.granularity, 64ull << 20);
}

Test(ctl, mirror_errors)
{
	reject("mirror", 1, "mirror", "usage: mirror IMAGE TARGET");
	reject("mirror vm.img", 1, "mirror", "usage: mirror IMAGE TARGET");
	reject("mirror /vm.img /n", 1, "mirror", "IMAGE '/vm.img'");
	reject("mirror vm.img n", 1, "mirror", "TARGET 'n'", "absolute");
	reject("mirror vm.img /n sync=incremental", 1, "mirror", "sync=incremental", "sync=full or sync=top");
	reject("mirror vm.img /n sync=none", 1, "mirror", "sync=none", "sync=full or sync=top");
	reject("mirror vm.img /n sync=bogus", 1, "mirror", "sync=bogus", "expected one of");
	reject("mirror vm.img /n copy-mode=async", 1, "mirror", "copy-mode=async",
	       "expected one of background, write-blocking");
	reject("mirror vm.img /n speed=fast", 1, "mirror", "speed=fast", "not a size");
	reject("mirror vm.img /n speed=20000000T", 1, "mirror", "speed=20000000T", "too large");
	reject("mirror vm.img /n id=.m", 1, "mirror", "id '.m'", "1 to 64");
	reject("mirror vm.img /n format=raw", 1, "mirror", "unknown option 'format'", "sync, speed, id, copy-mode");
	reject("mirror vm.img /n id=a id=b", 1, "mirror", "option id given twice");
	reject("mirror vm.img /n sync=top sync=top", 1, "mirror", "option sync given twice");
	reject("mirror vm.img /n granularity=3000", 1, "mirror", "granularity=3000", "power of two from 4K to 64M");
	reject("mirror vm.img /n granularity=2K", 1, "mirror", "granularity=2K", "from 4K");
	reject("mirror vm.img /n granularity=128M", 1, "mirror", "granularity=128M", "to 64M");
	reject("mirror vm.img /n on-target-error=panic", 1, "mirror", "on-target-error=panic", "expected one of");
	reject("mirror vm.img /n on-source-error=", 1, "mirror", "on-source-error");
	reject("mirror vm.img /n speed=", 1, "mirror", "option speed has an empty value");
	reject("mirror vm.img /n extra", 1, "mirror", "unexpected argument 'extra'");
}

/* ---- snapshot and release ---------------------------------------------- */

Test(ctl, snapshot)
{
	const struct ctl_command *cmd = parse_one("snapshot nightly pool/a.img b.img max-store=512M");
	const struct ctl_snapshot *s = &cmd->u.snapshot;

	cr_assert_eq(cmd->verb, CTL_SNAPSHOT);
	cr_assert_str_eq(s->name, "nightly");
	cr_assert_eq(s->nimages, 2);
	cr_assert_str_eq(s->images[0], "pool/a.img");
	cr_assert_str_eq(s->images[1], "b.img");
	cr_assert_eq(s->max_store, 512ull << 20);

	s = &parse_one("snapshot s1 a.img")->u.snapshot;
	cr_assert_eq(s->nimages, 1);
	cr_assert_eq(s->max_store, 0);
	cr_assert(!s->reflink, "reflink=off by default");
	cr_assert(!parse_one("snapshot s1 a.img reflink=off")->u.snapshot.reflink);
	cr_assert(parse_one("snapshot s1 a.img max-store=1M reflink=auto")->u.snapshot.reflink);
}

static char *snapshot_line(unsigned nimages)
{
	char *line = malloc(32 + 10 * nimages);
	cr_assert_not_null(line);
	strcpy(line, "snapshot many");
	for (unsigned i = 0; i < nimages; i++)
		sprintf(line + strlen(line), " i%02u.img", i);
	return line;
}

Test(ctl, snapshot_image_limit)
{
	char *line = snapshot_line(CTL_MAX_IMAGES);
	const struct ctl_snapshot *s = &parse_one(line)->u.snapshot;

	cr_assert_eq(s->nimages, CTL_MAX_IMAGES);
	cr_assert_str_eq(s->images[0], "i00.img");
	cr_assert_str_eq(s->images[CTL_MAX_IMAGES - 1], "i63.img");
	free(line);
	line = snapshot_line(CTL_MAX_IMAGES + 1);
	reject(line, 1, "snapshot", "at most 64 images");
	free(line);
}

Test(ctl, snapshot_errors)
{
	reject("snapshot", 1, "snapshot", "usage: snapshot NAME IMAGE");
	reject("snapshot s", 1, "snapshot", "usage: snapshot NAME IMAGE");
	reject("snapshot s max-store=1M", 1, "snapshot", "usage: snapshot NAME IMAGE");
	reject("snapshot .s a.img", 1, "snapshot", "snapshot name '.s'", "1 to 64");
	reject("snapshot s /a.img", 1, "snapshot", "IMAGE '/a.img'");
	reject("snapshot s a.img ../b.img", 1, "snapshot", "IMAGE '../b.img'");
	reject("snapshot s a.img max-store=lots", 1, "snapshot", "max-store=lots", "not a size");
	reject("snapshot s a.img max-store=20000000T", 1, "snapshot", "max-store=20000000T", "too large");
	reject("snapshot s a.img max-store=1M b.img", 1, "snapshot", "IMAGE 'b.img' after options");
	reject("snapshot s a.img b.img a.img", 1, "snapshot", "IMAGE 'a.img' given twice");
	reject("snapshot s a.img size=1M", 1, "snapshot", "unknown option 'size'", "max-store");
	reject("snapshot s a.img max-store=1M max-store=2M", 1, "snapshot", "option max-store given twice");
	reject("snapshot s a.img max-store=", 1, "snapshot", "option max-store has an empty value");
	reject("snapshot s a.img reflink=always", 1, "snapshot", "reflink=always", "expected one of auto, off");
	reject("snapshot s a.img reflink=off reflink=off", 1, "snapshot", "option reflink given twice");
}

Test(ctl, release)
{
	const struct ctl_command *cmd = parse_one("release nightly");

	cr_assert_eq(cmd->verb, CTL_RELEASE);
	cr_assert_str_eq(cmd->u.job.id, "nightly");
	reject("release", 1, "release", "usage: release NAME");
	reject("release a b", 1, "release", "usage: release NAME");
	reject("release .s", 1, "release", "snapshot name '.s'", "1 to 64");
}

/* ---- bitmap ------------------------------------------------------------- */

Test(ctl, bitmap_add)
{
	const struct ctl_command *cmd = parse_one("bitmap add pool/vm.img daily");
	const struct ctl_bitmap *b = &cmd->u.bitmap;

	cr_assert_eq(cmd->verb, CTL_BITMAP);
	cr_assert_eq(b->op, BITMAP_ADD);
	cr_assert_str_eq(b->image, "pool/vm.img");
	cr_assert_str_eq(b->name, "daily");
	cr_assert_eq(b->granularity, 0);
	cr_assert(!b->disabled);
	cr_assert_eq(b->nsources, 0);

	b = &parse_one("bitmap add vm.img d granularity=64K disabled")->u.bitmap;
	cr_assert_eq(b->granularity, 64ull << 10);
	cr_assert(b->disabled);
	b = &parse_one("bitmap add vm.img d disabled granularity=1M")->u.bitmap;
	cr_assert_eq(b->granularity, 1ull << 20);
	cr_assert(b->disabled);
	b = &parse_one("bitmap add vm.img d granularity=4096")->u.bitmap;
	cr_assert_eq(b->granularity, 4096);
	cr_assert(!b->disabled);
}

Test(ctl, bitmap_simple_ops)
{
	static const struct {
		const char *word;
		enum bitmap_op op;
	} ops[] = {
		{ "remove", BITMAP_REMOVE }, { "clear", BITMAP_CLEAR }, { "enable", BITMAP_ENABLE },
		{ "disable", BITMAP_DISABLE },
	};
	char text[128];

	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
		snprintf(text, sizeof(text), "bitmap %s pool/vm.img daily", ops[i].word);
		const struct ctl_bitmap *b = &parse_one(text)->u.bitmap;
		cr_assert_eq(b->op, ops[i].op, "%s", text);
		cr_assert_str_eq(b->image, "pool/vm.img");
		cr_assert_str_eq(b->name, "daily");

		snprintf(text, sizeof(text), "bitmap %s vm.img", ops[i].word);
		char usage[64];
		snprintf(usage, sizeof(usage), "usage: bitmap %s IMAGE NAME", ops[i].word);
		reject(text, 1, "bitmap", usage);
		cr_assert_null(strstr(err, "granularity"), "'%s' suggests add's options: %s", text, err);
		cr_assert_null(strstr(err, "SRC"), "'%s' suggests merge's sources: %s", text, err);

		snprintf(text, sizeof(text), "bitmap %s vm.img d disabled", ops[i].word);
		reject(text, 1, "bitmap", "unexpected argument 'disabled'");
		snprintf(text, sizeof(text), "bitmap %s vm.img d granularity=64K", ops[i].word);
		reject(text, 1, "bitmap", "unexpected argument 'granularity=64K'");
	}
}

Test(ctl, bitmap_merge)
{
	const struct ctl_bitmap *b = &parse_one("bitmap merge vm.img all d1 d2 d3")->u.bitmap;

	cr_assert_eq(b->op, BITMAP_MERGE);
	cr_assert_str_eq(b->image, "vm.img");
	cr_assert_str_eq(b->name, "all");
	cr_assert_eq(b->nsources, 3);
	cr_assert_str_eq(b->sources[0], "d1");
	cr_assert_str_eq(b->sources[1], "d2");
	cr_assert_str_eq(b->sources[2], "d3");
	b = &parse_one("bitmap merge vm.img all d1")->u.bitmap;
	cr_assert_eq(b->nsources, 1);
}

static char *merge_line(unsigned nsources)
{
	char *line = malloc(64 + 6 * nsources);
	cr_assert_not_null(line);
	strcpy(line, "bitmap merge vm.img dest");
	for (unsigned i = 0; i < nsources; i++)
		sprintf(line + strlen(line), " s%02u", i);
	return line;
}

Test(ctl, bitmap_merge_source_limit)
{
	char *line = merge_line(CTL_MAX_IMAGES);
	const struct ctl_bitmap *b = &parse_one(line)->u.bitmap;

	cr_assert_eq(b->nsources, CTL_MAX_IMAGES);
	cr_assert_str_eq(b->sources[CTL_MAX_IMAGES - 1], "s63");
	free(line);
	line = merge_line(CTL_MAX_IMAGES + 1);
	reject(line, 1, "bitmap", "at most 64 source bitmaps");
	free(line);
}

Test(ctl, bitmap_errors)
{
	reject("bitmap", 1, "bitmap", "usage: bitmap add|remove|clear|enable|disable|merge");
	reject("bitmap frob vm.img b", 1, "bitmap", "operation=frob",
	       "expected one of add, remove, clear, enable, disable, merge");
	reject("bitmap add", 1, "bitmap", "usage: bitmap add IMAGE NAME [granularity=SIZE] [disabled]");
	reject("bitmap add vm.img", 1, "bitmap", "usage: bitmap add IMAGE NAME [granularity=SIZE] [disabled]");
	reject("bitmap merge vm.img", 1, "bitmap", "usage: bitmap merge IMAGE NAME SRC [SRC ...]");
	reject("bitmap merge vm.img dest", 1, "bitmap", "usage: bitmap merge IMAGE DEST SRC [SRC ...]");
	reject("bitmap add /vm.img b", 1, "bitmap", "IMAGE '/vm.img'");
	reject("bitmap remove a//b b", 1, "bitmap", "IMAGE 'a//b'");
	reject("bitmap add vm.img .b", 1, "bitmap", "bitmap '.b'", "1 to 64");
	reject("bitmap merge vm.img .d s", 1, "bitmap", "bitmap '.d'", "1 to 64");
	reject("bitmap merge vm.img d s1 .s", 1, "bitmap", "source bitmap '.s'", "1 to 64");
	reject("bitmap add vm.img b disabled disabled", 1, "bitmap", "'disabled' given twice");
	reject("bitmap add vm.img b granularity=64K granularity=64K", 1, "bitmap", "option granularity given twice");
	reject("bitmap add vm.img b granularity=big", 1, "bitmap", "granularity=big", "not a size");
	reject("bitmap add vm.img b granularity=", 1, "bitmap", "granularity=", "not a size");
	reject("bitmap add vm.img b granularity=20000000T", 1, "bitmap", "granularity=20000000T", "too large");
	reject("bitmap add vm.img b granularity=3K", 1, "bitmap", "granularity=3K", "power of two");
	reject("bitmap add vm.img b granularity=0", 1, "bitmap", "granularity=0", "power of two");
	reject("bitmap add vm.img b enabled", 1, "bitmap", "unexpected argument 'enabled'");
	reject("bitmap add vm.img b size=1M", 1, "bitmap", "unexpected argument 'size=1M'");
}

/* ---- job verbs ---------------------------------------------------------- */

Test(ctl, job_verbs)
{
	static const struct {
		const char *word;
		enum ctl_verb verb;
	} verbs[] = {
		{ "cancel", CTL_CANCEL }, { "pause", CTL_PAUSE }, { "resume", CTL_RESUME },
		{ "complete", CTL_COMPLETE }, { "dismiss", CTL_DISMISS },
	};
	char text[128], usage[64];

	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
		snprintf(text, sizeof(text), "%s job-7", verbs[i].word);
		const struct ctl_command *cmd = parse_one(text);
		cr_assert_eq(cmd->verb, verbs[i].verb, "%s", text);
		cr_assert_str_eq(cmd->u.job.id, "job-7");
		cr_assert_eq(cmd->u.job.speed, 0);

		snprintf(usage, sizeof(usage), "usage: %s ID", verbs[i].word);
		reject(verbs[i].word, 1, verbs[i].word, usage);
		snprintf(text, sizeof(text), "%s a b", verbs[i].word);
		reject(text, 1, verbs[i].word, usage);
		snprintf(text, sizeof(text), "%s .a", verbs[i].word);
		reject(text, 1, verbs[i].word, "job id '.a'", "1 to 64");
	}
}

Test(ctl, set_speed)
{
	const struct ctl_command *cmd = parse_one("set job-1 speed=10M");

	cr_assert_eq(cmd->verb, CTL_SET);
	cr_assert_str_eq(cmd->u.job.id, "job-1");
	cr_assert_eq(cmd->u.job.speed, 10ull << 20);
	cr_assert_eq(parse_one("set job-1 speed=0")->u.job.speed, 0);
}

Test(ctl, set_errors)
{
	reject("set", 1, "set", "usage: set ID speed=RATE");
	reject("set job-1", 1, "set", "usage: set ID speed=RATE");
	reject("set job-1 speed=1 speed=2", 1, "set", "usage: set ID speed=RATE");
	reject("set .j speed=1", 1, "set", "job id '.j'", "1 to 64");
	reject("set job-1 100", 1, "set", "unexpected argument '100'", "speed");
	reject("set job-1 rate=1", 1, "set", "unknown option 'rate'", "known: speed");
	reject("set job-1 speed=", 1, "set", "option speed has an empty value");
	reject("set job-1 speed=fast", 1, "set", "speed=fast", "not a size");
	reject("set job-1 speed=20000000T", 1, "set", "speed=20000000T", "too large");
}

/* ---- names of enums ----------------------------------------------------- */

Test(ctl, enum_names)
{
	static const char *const verbs[] = { "backup", "mirror", "snapshot", "release", "bitmap", "cancel",
					     "pause", "resume", "complete", "dismiss", "set" };

	for (int v = CTL_BACKUP; v <= CTL_SET; v++)
		cr_assert_str_eq(ctl_verb_name((enum ctl_verb)v), verbs[v]);
	cr_assert_str_eq(ctl_sync_name(SYNC_FULL), "full");
	cr_assert_str_eq(ctl_sync_name(SYNC_TOP), "top");
	cr_assert_str_eq(ctl_sync_name(SYNC_INCREMENTAL), "incremental");
	cr_assert_str_eq(ctl_sync_name(SYNC_NONE), "none");
	cr_assert_str_eq(ctl_format_name(FORMAT_RAW), "raw");
	cr_assert_str_eq(ctl_format_name(FORMAT_QCOW2), "qcow2");
}

/* Every verb word the parser accepts maps back to the same name. */
Test(ctl, verb_words_round_trip)
{
	static const char *const texts[] = {
		"backup v /t", "mirror v /t", "snapshot s v", "release s", "bitmap add v b", "cancel j",
		"pause j", "resume j", "complete j", "dismiss j", "set j speed=1",
	};

	for (int v = CTL_BACKUP; v <= CTL_SET; v++) {
		const struct ctl_command *cmd = parse_one(texts[v]);
		cr_assert_eq(cmd->verb, (enum ctl_verb)v, "%s", texts[v]);
		cr_assert_eq(strncmp(texts[v], ctl_verb_name(cmd->verb), strlen(ctl_verb_name(cmd->verb))), 0);
	}
}

/* ---- begin ... commit: one transaction over several writes ------------------ */

static struct ctl_session session;

static void end_session(void)
{
	ctl_session_end(&session);
}

TestSuite(session, .fini = end_session);

static enum ctl_feed_action action;

static int feed_len(const char *text, size_t len)
{
	memset(err, 0, sizeof(err));
	action = (enum ctl_feed_action)-1;
	return ctl_session_feed(&session, text, len, &action, err, sizeof(err));
}

static int feed(const char *text)
{
	return feed_len(text, strlen(text));
}

static void feed_ok(const char *text, enum ctl_feed_action want)
{
	int rc = feed(text);
	cr_assert_eq(rc, 0, "'%s' refused (%d): %s", text, rc, err);
	cr_assert_eq(action, want, "'%s': action %d, want %d", text, action, want);
}

/* The write fails with want_rc, its message holds every key, and no
 * transaction is open afterwards. */
static void feed_refused(const char *text, int want_rc, const char *const *keys)
{
	int rc = feed(text);
	cr_assert_eq(rc, want_rc, "'%s': rc %d, want %d (%s)", text, rc, want_rc, err);
	cr_assert(err[0] && !strchr(err, '\n'), "'%s': message '%s' is not one line", text, err);
	for (; keys && *keys; keys++)
		cr_assert(strstr(err, *keys), "'%s': message '%s' lacks '%s'", text, err, *keys);
	cr_assert(!session.open, "'%s': a transaction is still open", text);
	cr_assert_eq(session.len, 0);
	cr_assert_eq(session.lines, 0);
	cr_assert_null(session.text);
}

static void assert_text(const char *want)
{
	cr_assert(session.open);
	cr_assert_eq(session.len, strlen(want), "text '%.*s', want '%s'", (int)session.len,
		     session.text ? session.text : "", want);
	if (session.len) /* text is NULL before anything was added */
		cr_assert_eq(memcmp(session.text, want, session.len), 0, "text '%.*s', want '%s'", (int)session.len,
			     session.text, want);
}

#define KEYS(...) ((const char *const[]){ __VA_ARGS__, NULL })

Test(session, without_begin_every_write_runs_by_itself)
{
	static const char *const texts[] = {
		"backup a.img /t/a", "backup a.img /t/a\nbackup b.img /t/b\n", "", "\n\n", "# begin\n",
		"  # commit", "beginning x", "committed", "aborted", "frobnicate", "backup begin /t/begin",
		"cancel commit", "\"begin\"",
	};

	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		feed_ok(texts[i], CTL_FEED_RUN);
		cr_assert(!session.open, "'%s' opened a transaction", texts[i]);
		cr_assert_null(session.text, "'%s' kept text", texts[i]);
	}
}

Test(session, begin_append_commit)
{
	feed_ok("begin\n", CTL_FEED_APPENDED);
	assert_text("");
	feed_ok("backup db.img /backup/db.raw id=db\n", CTL_FEED_APPENDED);
	feed_ok("# a comment, and a blank line\n\n", CTL_FEED_APPENDED);
	feed_ok("backup app.img /backup/app.raw id=app", CTL_FEED_APPENDED); /* no newline */
	cr_assert_eq(session.lines, 2);
	feed_ok("commit\n", CTL_FEED_COMMIT);
	assert_text("backup db.img /backup/db.raw id=db\nbackup app.img /backup/app.raw id=app\n");
	/* The text is one transaction for ctl_parse (and so txn_execute). */
	cr_assert_eq(ctl_parse(session.text, session.len, &txn, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(txn.ncmds, 2);
	cr_assert_str_eq(txn.cmds[0].u.backup.id, "db");
	cr_assert_str_eq(txn.cmds[1].u.backup.id, "app");
	cr_assert(ctl_session_end(&session));
	cr_assert(!session.open);
	cr_assert(!ctl_session_end(&session));
	/* Closed: the next write is a transaction of its own again. */
	feed_ok("backup c.img /t/c", CTL_FEED_RUN);
}

Test(session, everything_in_one_write)
{
	feed_ok("# header\n  begin \t\r\nbackup a.img /t/a\n\nbackup b.img /t/b\ncommit\r\n# trailer\n", CTL_FEED_COMMIT);
	assert_text("backup a.img /t/a\nbackup b.img /t/b\n");
	ctl_session_end(&session);
	/* Commands after begin in the opening write, more in later writes. */
	feed_ok("begin\nbackup a.img /t/a\nbackup b.img /t/b", CTL_FEED_APPENDED);
	feed_ok("backup c.img /t/c\ncommit", CTL_FEED_COMMIT);
	assert_text("backup a.img /t/a\nbackup b.img /t/b\nbackup c.img /t/c\n");
	cr_assert_eq(session.lines, 3);
}

Test(session, abort_drops)
{
	feed_ok("begin", CTL_FEED_APPENDED);
	feed_ok("backup a.img /t/a", CTL_FEED_APPENDED);
	feed_ok("backup b.img /t/b\nabort\n", CTL_FEED_ABORTED);
	cr_assert(!session.open);
	cr_assert_null(session.text);
	feed_refused("commit", -EINVAL, KEYS("commit", "no transaction is open"));
	feed_ok("begin\nabort", CTL_FEED_ABORTED);
	cr_assert(!session.open);
}

Test(session, misplaced_words)
{
	/* Without a transaction. */
	feed_refused("commit", -EINVAL, KEYS("commit: no transaction is open", "begin"));
	feed_refused("abort\n", -EINVAL, KEYS("abort: no transaction is open"));
	feed_refused("backup a.img /t/a\ncommit", -EINVAL, KEYS("commit: no transaction is open"));
	feed_refused("backup a.img /t/a\nbegin", -EINVAL, KEYS("begin must be the first command of its write"));
	feed_refused("begin\nbegin", -EINVAL, KEYS("begin: a transaction is already open"));
	feed_refused("begin\ncommit\nbackup a.img /t/a", -EINVAL, KEYS("commit must be the last command of its write"));
	feed_refused("begin\ncommit\ncommit", -EINVAL, KEYS("commit must be the last command"));
	feed_refused("begin\nabort\nbackup a.img /t/a", -EINVAL, KEYS("abort must be the last command of its write"));
	feed_refused("begin now", -EINVAL, KEYS("begin takes no arguments"));
	feed_refused("begin\ncommit", -EINVAL, KEYS("commit: the transaction is empty"));
	/* Refusals inside a transaction abort it, and say so. */
	static const struct {
		const char *text;
		const char *key;
	} inside[] = {
		{ "begin", "begin: a transaction is already open on this file" },
		{ "# x\nbegin", "begin: a transaction is already open" },
		{ "backup a.img /t/a\nbegin", "begin: a transaction is already open" },
		{ "commit\nbackup b.img /t/b", "commit must be the last command of its write" },
		{ "commit\n# fine\nabort", "commit must be the last command" },
		{ "abort\nbackup b.img /t/b", "abort must be the last command of its write" },
		{ "commit please", "commit takes no arguments" },
		{ "abort it", "abort takes no arguments" },
	};
	for (size_t i = 0; i < sizeof(inside) / sizeof(inside[0]); i++) {
		feed_ok("begin", CTL_FEED_APPENDED);
		feed_ok("backup a.img /t/a", CTL_FEED_APPENDED);
		feed_refused(inside[i].text, -EINVAL,
			     KEYS(inside[i].key, "the transaction was aborted, nothing of it ran"));
		feed_refused("commit", -EINVAL, KEYS("no transaction is open"));
	}
}

Test(session, a_bad_line_aborts_the_transaction)
{
	feed_ok("begin", CTL_FEED_APPENDED);
	feed_ok("backup a.img /t/a id=a", CTL_FEED_APPENDED);
	feed_ok("# comments and blank lines do not count\n\n", CTL_FEED_APPENDED);
	/* Checked when written, numbered within the transaction. */
	feed_refused("backup b.img /t/b colour=blue", -EINVAL,
		     KEYS("line 2: backup: unknown option 'colour'", "the transaction was aborted, nothing of it ran"));
	feed_refused("commit", -EINVAL, KEYS("no transaction is open"));

	feed_ok("begin\nbackup a.img /t/a", CTL_FEED_APPENDED);
	feed_ok("backup b.img /t/b\nbackup c.img /t/c", CTL_FEED_APPENDED);
	feed_refused("backup d.img /t/d\nfrobnicate\ncommit", -EINVAL, KEYS("line 5: unknown command 'frobnicate'", "aborted"));
	/* In the opening write, the transaction was never open. */
	feed_refused("begin\nbackup a.img", -EINVAL, KEYS("line 1: backup: usage"));
	cr_assert(!strstr(err, "aborted"), "message '%s'", err);
	/* A NUL byte, a line too long. */
	feed_ok("begin\nbackup a.img /t/a", CTL_FEED_APPENDED);
	static const char nul[] = "backup b.img /t/b\0 id=x\n";
	cr_assert_eq(feed_len(nul, sizeof(nul) - 1), -EINVAL);
	cr_assert(strstr(err, "line 2: contains a NUL byte"), "message '%s'", err);
	cr_assert(!session.open);
	char longline[CTL_MAX_LINE + 40];
	snprintf(longline, sizeof(longline), "backup a.img /t/%0*d", CTL_MAX_LINE, 0);
	feed_ok("begin", CTL_FEED_APPENDED);
	feed_refused(longline, -EINVAL, KEYS("line 1: longer than", "aborted"));
}

Test(session, size_cap)
{
	cr_assert_eq(CTL_SESSION_MAX, 16u << 20);
	session.max = 64;
	feed_ok("begin", CTL_FEED_APPENDED);
	feed_ok("backup a.img /t/a", CTL_FEED_APPENDED);            /* 18 bytes */
	feed_ok("backup b.img /t/b\nbackup c.img /t/c", CTL_FEED_APPENDED); /* 54 */
	feed_refused("backup d.img /t/d", -EMSGSIZE,
		     KEYS("the transaction would be larger than 64 bytes", "aborted, nothing of it ran"));
	/* The cap stays with the session, and exactly the cap fits. */
	cr_assert_eq(session.max, 64);
	feed_ok("begin\nbackup a.img /t/a\nbackup b.img /t/b\nbackup c.img /t/c", CTL_FEED_APPENDED);
	feed_ok("cancel ab", CTL_FEED_APPENDED);                    /* 10: 64 */
	cr_assert_eq(session.len, 64);
	feed_ok("commit", CTL_FEED_COMMIT);
	ctl_session_end(&session);

	/* And a number of commands. */
	cr_assert_eq(CTL_SESSION_MAX_COMMANDS, 131072u);
	session.max = 0;
	session.max_lines = 3;
	feed_ok("begin\ncancel a\ncancel b", CTL_FEED_APPENDED);
	feed_ok("cancel c\n# not a command\n\n", CTL_FEED_APPENDED);
	feed_refused("cancel d", -EMSGSIZE, KEYS("the transaction would have more than 3 commands", "aborted"));
	cr_assert_eq(session.max_lines, 3);
	feed_ok("begin\ncancel a\ncancel b\ncancel c\ncommit", CTL_FEED_COMMIT);
	cr_assert_eq(session.lines, 3);
}

/* Many small writes, as a shell makes them: the text grows, every command
 * is kept in order. */
Test(session, many_writes)
{
	char line[64], want[64];

	feed_ok("begin", CTL_FEED_APPENDED);
	for (int i = 0; i < 5000; i++) {
		snprintf(line, sizeof(line), "cancel job-%d\n", i);
		feed_ok(line, CTL_FEED_APPENDED);
	}
	feed_ok("commit\n", CTL_FEED_COMMIT);
	cr_assert_eq(session.lines, 5000);
	cr_assert_eq(ctl_parse(session.text, session.len, &txn, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(txn.ncmds, 5000);
	for (int i = 0; i < 5000; i += 499) {
		snprintf(want, sizeof(want), "job-%d", i);
		cr_assert_str_eq(txn.cmds[i].u.job.id, want);
		cr_assert_eq(txn.cmds[i].line, (unsigned)i + 1);
	}
}

/* A FUSE write buffer is not NUL-terminated: nothing past len is read. */
Test(session, unterminated_text_not_read_past_len)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	static const char *const texts[] = { "begin", "backup a.img /t/a", "   ", "# c", "commit" };
	static const enum ctl_feed_action want[] = { CTL_FEED_APPENDED, CTL_FEED_APPENDED, CTL_FEED_APPENDED,
						     CTL_FEED_APPENDED, CTL_FEED_COMMIT };

	cr_assert_neq(map, MAP_FAILED);
	cr_assert_eq(mprotect(map + page, page, PROT_NONE), 0);
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		size_t n = strlen(texts[i]);
		memcpy(map + page - n, texts[i], n);
		cr_assert_eq(feed_len(map + page - n, n), 0, "'%s': %s", texts[i], err);
		cr_assert_eq(action, want[i], "'%s'", texts[i]);
	}
	assert_text("backup a.img /t/a\n");
	munmap(map, 2 * page);
}
