//! Mailboxes: lock release requests between hosts, through the disk.
//!
//! Every slot has one mailbox sector after its heartbeat sector. A host that wants a
//! lock another host holds posts a request into the holder's mailbox; the holder reads
//! its own mailbox often, releases what is asked, and removes the requests. Both sides
//! change the sector only by ATS from the image they read.

use crate::format::{
    encode_padded, BlockNo, Geometry, MailRequest, Mailbox, OnDisk, MAILBOX_REQUESTS_MAX,
};
use crate::lun::{Caw, Lun, LunError};

/// Attempts at one ATS update before giving up (each retry follows a concurrent
/// change by another host).
const ATTEMPTS_MAX: u32 = 16;

/// A mailbox as read: raw sector and decoded requests. A sector that is all zeros or
/// does not decode reads as empty (and is overwritten by the next post).
#[derive(Clone, Debug)]
pub struct MailboxState {
    pub raw: Vec<u8>,
    pub mailbox: Mailbox,
}

impl MailboxState {
    pub fn requests(&self) -> &[MailRequest] {
        &self.mailbox.requests[..(self.mailbox.count as usize).min(MAILBOX_REQUESTS_MAX)]
    }
}

pub fn read_mailbox(lun: &dyn Lun, geo: &Geometry, slot: u32) -> Result<MailboxState, LunError> {
    let mut raw = vec![0u8; geo.ats_sector_size as usize];
    lun.read_at(&mut raw, geo.mailbox_offset(slot))?;
    let mailbox = match Mailbox::decode(&raw, geo.hb_start) {
        Ok(m) if m.slot == slot => m,
        _ => {
            let mut empty: Mailbox = bytemuck::Zeroable::zeroed();
            empty.magic = Mailbox::MAGIC;
            empty.slot = slot;
            empty
        }
    };
    Ok(MailboxState { raw, mailbox })
}

fn encode(mailbox: &Mailbox, sector: u32) -> Vec<u8> {
    let mut sealed = *mailbox;
    sealed.change_seq = sealed.change_seq.wrapping_add(1);
    sealed.seal();
    encode_padded(&sealed, sector as usize)
}

/// Applies `change` to `slot`'s mailbox by ATS, re-reading on a miscompare. `change`
/// returns false when there is nothing to write.
fn update(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    change: &dyn Fn(&mut Mailbox) -> bool,
) -> Result<bool, LunError> {
    let mut state = read_mailbox(lun, geo, slot)?;
    for _ in 0..ATTEMPTS_MAX {
        let mut next = state.mailbox;
        if !change(&mut next) {
            return Ok(false);
        }
        let image = encode(&next, geo.ats_sector_size);
        match lun.compare_and_write(geo.mailbox_offset(slot), &state.raw, &image) {
            Ok(Caw::Written) => return Ok(true),
            Ok(Caw::Miscompare(actual)) if actual == image => return Ok(true),
            // A sector locked by a host stopped inside a test-and-set: try later, not
            // once per attempt.
            Err(e @ LunError::AtsTimeout { .. }) => return Err(e),
            Ok(Caw::Miscompare(_)) | Err(_) => state = read_mailbox(lun, geo, slot)?,
        }
    }
    Ok(false)
}

/// A recovery's mark in a slot's mailbox (Disk Paxos volumes): the generation of the
/// slot it took over, and its random nonce (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryMark {
    pub generation: u32,
    pub nonce: u32,
}

impl RecoveryMark {
    /// A mark for a recovery of `generation` starting now.
    pub fn new(generation: u32) -> RecoveryMark {
        RecoveryMark {
            generation,
            nonce: rand::random::<u32>().max(1),
        }
    }
}

/// Marks `slot`'s mailbox with `mark` (replacing an older recovery's), keeping its
/// requests. Fails when the mailbox could not be written.
pub fn mark_recovered(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    mark: RecoveryMark,
) -> Result<(), LunError> {
    update(lun, geo, slot, &|m| {
        if (m.recovered_gen, m.recovery_mark) == (mark.generation, mark.nonce) {
            return false;
        }
        m.recovered_gen = mark.generation;
        m.recovery_mark = mark.nonce;
        true
    })?;
    if recovery_mark(lun, geo, slot)? == Some(mark) {
        return Ok(());
    }
    Err(LunError::Io {
        device: lun.describe(),
        op: "recovery mark",
        offset: geo.mailbox_offset(slot),
        source: std::io::Error::other("the mailbox kept changing; it was not marked"),
    })
}

/// The mark of the last recovery of `slot`, if any.
pub fn recovery_mark(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
) -> Result<Option<RecoveryMark>, LunError> {
    let m = read_mailbox(lun, geo, slot)?.mailbox;
    Ok((m.recovery_mark != 0).then_some(RecoveryMark {
        generation: m.recovered_gen,
        nonce: m.recovery_mark,
    }))
}

/// Asks the host in `holder_slot` to release `resource`. Returns false when its
/// mailbox is full or too busy (the caller just waits and asks again).
pub fn post_request(
    lun: &dyn Lun,
    geo: &Geometry,
    holder_slot: u32,
    request: MailRequest,
) -> Result<bool, LunError> {
    update(lun, geo, holder_slot, &|m| {
        let count = (m.count as usize).min(MAILBOX_REQUESTS_MAX);
        if m.requests[..count]
            .iter()
            .any(|r| r.resource == request.resource && r.from_slot == request.from_slot)
        {
            return false;
        }
        if count == MAILBOX_REQUESTS_MAX {
            return false;
        }
        m.requests[count] = request;
        m.count = count as u32 + 1;
        true
    })
}

/// Removes the requests for `resources` from our own mailbox.
pub fn remove_requests(
    lun: &dyn Lun,
    geo: &Geometry,
    my_slot: u32,
    resources: &[BlockNo],
) -> Result<(), LunError> {
    update(lun, geo, my_slot, &|m| {
        let count = (m.count as usize).min(MAILBOX_REQUESTS_MAX);
        let kept: Vec<MailRequest> = m.requests[..count]
            .iter()
            .filter(|r| !resources.contains(&r.resource))
            .copied()
            .collect();
        if kept.len() == count {
            return false;
        }
        m.requests = [MailRequest::default(); MAILBOX_REQUESTS_MAX];
        m.requests[..kept.len()].copy_from_slice(&kept);
        m.count = kept.len() as u32;
        true
    })?;
    Ok(())
}
