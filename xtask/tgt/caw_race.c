/*
 * caw-race: one iSCSI initiator that increments a counter in LBA 0 with
 * COMPARE AND WRITE, for `cargo xtask tgt check` (xtask/src/tgt.rs builds it
 * against libiscsi).
 *
 *   caw-race URL INITIATOR_IQN COUNT   increment COUNT times; print
 *                                      "successes S miscompares M"
 *   caw-race URL INITIATOR_IQN 0       print "counter C"
 *
 * The counter is the little-endian u64 in the first 8 bytes of LBA 0. Each
 * increment reads LBA 0 and sends CAW(old sector -> sector with counter + 1);
 * a miscompare means another initiator got there first, so it reads again.
 * When several of these run at once, the final counter must equal the sum of
 * their successes: a smaller counter means two CAWs both matched the same old
 * value, i.e. the target's compare and write are not atomic.
 *
 * Exit: 0 done, 1 usage, 2 iSCSI error, 3 too many miscompares.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

/* Bounds every retry loop: a target that always miscompares stops us. */
#define MISCOMPARES_MAX 10000000ULL

static uint64_t get_le64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

static void put_le64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++, v >>= 8)
		p[i] = v & 0xff;
}

static int fail(struct iscsi_context *iscsi, const char *what)
{
	fprintf(stderr, "caw-race: %s: %s\n", what, iscsi_get_error(iscsi));
	return 2;
}

/* Reads LBA 0 into buf (block_size bytes); 0 on success. */
static int read_lba0(struct iscsi_context *iscsi, int lun, int block_size,
		     unsigned char *buf)
{
	struct scsi_task *task = iscsi_read16_sync(iscsi, lun, 0, block_size,
						   block_size, 0, 0, 1, 0, 0);
	if (!task || task->status != SCSI_STATUS_GOOD) {
		if (task)
			scsi_free_scsi_task(task);
		return -1;
	}
	memcpy(buf, task->datain.data, block_size);
	scsi_free_scsi_task(task);
	return 0;
}

/* 0: written; 1: miscompare; -1: error. */
static int caw_lba0(struct iscsi_context *iscsi, int lun, int block_size,
		    unsigned char *old_new)
{
	struct scsi_task *task = iscsi_compareandwrite_sync(
		iscsi, lun, 0, old_new, 2 * block_size, block_size, 0, 0, 1, 0, 0);
	int ret = -1;
	if (task && task->status == SCSI_STATUS_GOOD)
		ret = 0;
	else if (task && task->status == SCSI_STATUS_CHECK_CONDITION &&
		 task->sense.key == SCSI_SENSE_MISCOMPARE)
		ret = 1;
	if (task)
		scsi_free_scsi_task(task);
	return ret;
}

static int block_size_of(struct iscsi_context *iscsi, int lun)
{
	struct scsi_task *task = iscsi_readcapacity16_sync(iscsi, lun);
	int size = -1;
	if (task && task->status == SCSI_STATUS_GOOD) {
		struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(task);
		if (rc)
			size = rc->block_length;
	}
	if (task)
		scsi_free_scsi_task(task);
	return size;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: caw-race URL INITIATOR_IQN COUNT\n");
		return 1;
	}
	unsigned long long count = strtoull(argv[3], NULL, 10);
	struct iscsi_context *iscsi = iscsi_create_context(argv[2]);
	if (!iscsi) {
		fprintf(stderr, "caw-race: cannot create an iSCSI context\n");
		return 2;
	}
	struct iscsi_url *url = iscsi_parse_full_url(iscsi, argv[1]);
	if (!url)
		return fail(iscsi, "bad URL");
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0)
		return fail(iscsi, "login");
	int lun = url->lun;
	int block_size = block_size_of(iscsi, lun);
	if (block_size < 8)
		return fail(iscsi, "READ CAPACITY(16)");
	unsigned char *old_new = malloc(2 * (size_t)block_size);
	if (!old_new)
		return 2;
	if (count == 0) {
		if (read_lba0(iscsi, lun, block_size, old_new) != 0)
			return fail(iscsi, "READ(16)");
		printf("counter %llu\n", (unsigned long long)get_le64(old_new));
		return 0;
	}
	unsigned long long successes = 0, miscompares = 0;
	while (successes < count) {
		if (read_lba0(iscsi, lun, block_size, old_new) != 0)
			return fail(iscsi, "READ(16)");
		memcpy(old_new + block_size, old_new, block_size);
		put_le64(old_new + block_size, get_le64(old_new) + 1);
		int r = caw_lba0(iscsi, lun, block_size, old_new);
		if (r < 0)
			return fail(iscsi, "COMPARE AND WRITE");
		if (r == 0)
			successes++;
		else if (++miscompares > MISCOMPARES_MAX)
			return 3;
	}
	printf("successes %llu miscompares %llu\n", successes, miscompares);
	iscsi_logout_sync(iscsi);
	iscsi_destroy_url(url);
	iscsi_destroy_context(iscsi);
	free(old_new);
	return 0;
}
