/*
 * pr-fence: storage-side fencing with SCSI-3 persistent reservations, as atsfs
 * means to use it, against one LUN; for `cargo xtask tgt check`
 * (xtask/src/tgt.rs builds it against libiscsi).
 *
 *   pr-fence URL
 *
 * Two initiators, A and B (two sessions with their own initiator names):
 *  1. both register (REGISTER AND IGNORE EXISTING KEY), A reserves the LUN
 *     Write Exclusive - Registrants Only (type 5);
 *  2. B, a registrant, may COMPARE AND WRITE and WRITE;
 *  3. A preempts B's key: now B's COMPARE AND WRITE and WRITE must fail with
 *     RESERVATION CONFLICT, B's READ must still work, A's CAW must work;
 *  4. informational: PREEMPT AND ABORT, and whether B is still a registrant
 *     after it logs in again (a new I_T nexus);
 *  5. A clears every registration and the reservation.
 *
 * Prints one "ok:"/"FAILED:"/"info:" line per check; exit 0 when every
 * required check held, 1 when one did not, 2 on an iSCSI error.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define KEY_A 0xa7a7a7a7a7a7a7a7ULL
#define KEY_B 0xb8b8b8b8b8b8b8b8ULL
#define BLOCK_MAX 4096

static int failures;
static int lun;
static const char *url_text;

static struct iscsi_context *login(const char *initiator)
{
	struct iscsi_context *iscsi = iscsi_create_context(initiator);
	if (!iscsi)
		exit(2);
	struct iscsi_url *url = iscsi_parse_full_url(iscsi, url_text);
	if (!url) {
		fprintf(stderr, "pr-fence: bad URL: %s\n", iscsi_get_error(iscsi));
		exit(2);
	}
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	/* One ISID per initiator name, so that logging in again is the same
	 * initiator port (SPC: registrations belong to the I_T nexus). */
	uint32_t isid = 2166136261u;
	for (const char *c = initiator; *c; c++)
		isid = (isid ^ (unsigned char)*c) * 16777619u;
	iscsi_set_isid_random(iscsi, isid & 0xffffff, 0);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "pr-fence: login as %s: %s\n", initiator,
			iscsi_get_error(iscsi));
		exit(2);
	}
	lun = url->lun;
	iscsi_destroy_url(url);
	return iscsi;
}

/* The status of a task (or -1 without one), freeing it. */
static int status_of(struct scsi_task *task)
{
	if (!task)
		return -1;
	int status = task->status;
	scsi_free_scsi_task(task);
	return status;
}

static const char *status_name(int status)
{
	switch (status) {
	case SCSI_STATUS_GOOD: return "GOOD";
	case SCSI_STATUS_CHECK_CONDITION: return "CHECK CONDITION";
	case SCSI_STATUS_RESERVATION_CONFLICT: return "RESERVATION CONFLICT";
	case -1: return "no answer";
	default: return "another status";
	}
}

/* Records a check: `required` failures count, others are reported as info. */
static void check(const char *what, int status, int want, int required)
{
	const char *tag = status == want ? "ok" : (required ? "FAILED" : "info");
	printf("%s: %s: %s (want %s)\n", tag, what, status_name(status),
	       status_name(want));
	if (status != want && required)
		failures++;
}

static int prout(struct iscsi_context *iscsi, int sa, int type, uint64_t key,
		 uint64_t sa_key)
{
	struct scsi_persistent_reserve_out_basic params;
	memset(&params, 0, sizeof(params));
	params.reservation_key = key;
	params.service_action_reservation_key = sa_key;
	return status_of(iscsi_persistent_reserve_out_sync(
		iscsi, lun, sa, SCSI_PERSISTENT_RESERVE_SCOPE_LU, type, &params));
}

/* Writes LBA 1 with a plain WRITE(16). */
static int write_lba1(struct iscsi_context *iscsi, unsigned char *block, int size)
{
	return status_of(iscsi_write16_sync(iscsi, lun, 1, block, size, size, 0,
					    0, 0, 0, 0));
}

/* Reads LBA 1 into block, then CAWs it with itself (always matches). */
static int caw_lba1(struct iscsi_context *iscsi, unsigned char *old_new, int size)
{
	struct scsi_task *task =
		iscsi_read16_sync(iscsi, lun, 1, size, size, 0, 0, 0, 0, 0);
	if (!task || task->status != SCSI_STATUS_GOOD)
		return status_of(task);
	memcpy(old_new, task->datain.data, size);
	memcpy(old_new + size, task->datain.data, size);
	scsi_free_scsi_task(task);
	return status_of(iscsi_compareandwrite_sync(iscsi, lun, 1, old_new,
						    2 * size, size, 0, 0, 0, 0, 0));
}

static int read_lba1(struct iscsi_context *iscsi, int size)
{
	return status_of(iscsi_read16_sync(iscsi, lun, 1, size, size, 0, 0, 0, 0, 0));
}

static int block_size_of(struct iscsi_context *iscsi)
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

/* Logs in as `initiator`, swallowing the unit attention a new nexus may get. */
static struct iscsi_context *login_ready(const char *initiator)
{
	struct iscsi_context *iscsi = login(initiator);
	status_of(iscsi_testunitready_sync(iscsi, lun));
	return iscsi;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: pr-fence URL\n");
		return 1;
	}
	url_text = argv[1];
	struct iscsi_context *a = login_ready("iqn.2026-12.org.atsfs:pr-fence-a");
	struct iscsi_context *b = login_ready("iqn.2026-12.org.atsfs:pr-fence-b");
	int size = block_size_of(a);
	if (size <= 0 || size > BLOCK_MAX) {
		fprintf(stderr, "pr-fence: READ CAPACITY(16) failed\n");
		return 2;
	}
	unsigned char block[BLOCK_MAX];
	unsigned char old_new[2 * BLOCK_MAX];
	memset(block, 0x5a, sizeof(block));
	int ignore = SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY;
	int type5 = SCSI_PERSISTENT_RESERVE_TYPE_WRITE_EXCLUSIVE_REGISTRANTS_ONLY;

	check("A registers", prout(a, ignore, 0, 0, KEY_A), SCSI_STATUS_GOOD, 1);
	check("B registers", prout(b, ignore, 0, 0, KEY_B), SCSI_STATUS_GOOD, 1);
	check("A reserves (Write Exclusive - Registrants Only)",
	      prout(a, SCSI_PERSISTENT_RESERVE_RESERVE, type5, KEY_A, 0),
	      SCSI_STATUS_GOOD, 1);
	check("B (registrant) writes", write_lba1(b, block, size), SCSI_STATUS_GOOD, 1);
	check("B (registrant) compares and writes", caw_lba1(b, old_new, size),
	      SCSI_STATUS_GOOD, 1);
	check("A preempts B's key",
	      prout(a, SCSI_PERSISTENT_RESERVE_PREEMPT, type5, KEY_A, KEY_B),
	      SCSI_STATUS_GOOD, 1);
	/* B may see a unit attention for the preemption first. */
	status_of(iscsi_testunitready_sync(b, lun));
	check("B (preempted) compares and writes", caw_lba1(b, old_new, size),
	      SCSI_STATUS_RESERVATION_CONFLICT, 1);
	check("B (preempted) writes", write_lba1(b, block, size),
	      SCSI_STATUS_RESERVATION_CONFLICT, 1);
	check("B (preempted) reads", read_lba1(b, size), SCSI_STATUS_GOOD, 1);
	check("A (holder) compares and writes", caw_lba1(a, old_new, size),
	      SCSI_STATUS_GOOD, 1);

	check("B registers again", prout(b, ignore, 0, 0, KEY_B), SCSI_STATUS_GOOD, 1);
	check("A preempts B's key and aborts its commands (PREEMPT AND ABORT)",
	      prout(a, SCSI_PERSISTENT_RESERVE_PREEMPT_AND_ABORT, type5, KEY_A, KEY_B),
	      SCSI_STATUS_GOOD, 0);
	check("B registers once more", prout(b, ignore, 0, 0, KEY_B), SCSI_STATUS_GOOD, 1);
	iscsi_logout_sync(b);
	iscsi_destroy_context(b);
	b = login_ready("iqn.2026-12.org.atsfs:pr-fence-b");
	check("B, logged in again, still writes as a registrant",
	      write_lba1(b, block, size), SCSI_STATUS_GOOD, 0);

	check("A clears", prout(a, SCSI_PERSISTENT_RESERVE_CLEAR, 0, KEY_A, 0),
	      SCSI_STATUS_GOOD, 1);
	status_of(iscsi_testunitready_sync(b, lun));
	check("B writes once the reservation is cleared", write_lba1(b, block, size),
	      SCSI_STATUS_GOOD, 1);
	iscsi_logout_sync(a);
	iscsi_logout_sync(b);
	iscsi_destroy_context(a);
	iscsi_destroy_context(b);
	return failures ? 1 : 0;
}
