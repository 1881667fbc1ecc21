//! A tiny SCSI disk in memory, for tests: READ/WRITE(16), COMPARE AND WRITE
//! (atomic under one mutex), SYNCHRONIZE CACHE, READ CAPACITY(16), the Block Limits
//! VPD page, REPORT SUPPORTED OPERATION CODES, and persistent reservations (register,
//! reserve, release, preempt, with RESERVATION CONFLICT for writes of unregistered
//! initiators under a Write Exclusive – Registrants Only reservation and unit
//! attentions for the preempted). Faults are injected per initiator.

#![allow(clippy::big_endian_bytes)]

use super::{cdb, sense, DataDir, ScsiStatus, ScsiTransport, TransportError};
use super::{STATUS_CHECK_CONDITION, STATUS_GOOD, STATUS_RESERVATION_CONFLICT};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// What a fake device is and can do.
#[derive(Clone)]
pub(crate) struct FakeConfig {
    pub logical_bytes: u32,
    pub physical_exponent: u8,
    pub blocks: u64,
    pub caw: bool,
    pub rsoc: bool,
    /// MAXIMUM COMPARE AND WRITE LENGTH (None: no Block Limits page).
    pub max_caw_blocks: Option<u8>,
    pub descriptor_sense: bool,
    pub sync16: bool,
    /// PREEMPT AND ABORT is implemented (tgt lacks it).
    pub preempt_abort: bool,
    /// COMPARE AND WRITE writes without comparing (a broken target).
    pub compare_broken: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            logical_bytes: 512,
            physical_exponent: 0,
            blocks: 2048,
            caw: true,
            rsoc: true,
            max_caw_blocks: Some(0),
            descriptor_sense: false,
            sync16: true,
            preempt_abort: true,
            compare_broken: false,
        }
    }
}

/// A fault served instead of (or after) a command of one initiator.
pub(crate) enum Fault {
    /// Answer with this status and sense; the command does not run.
    Reply(u8, Vec<u8>),
    /// The connection drops before the command runs.
    LostBefore,
    /// The command runs, then the connection drops (a lost reply).
    LostAfter,
}

struct State {
    data: Vec<u8>,
    registrations: Vec<(u32, u64)>,
    reservation: Option<(u32, u8)>,
    attentions: HashMap<u32, VecDeque<(u8, u8)>>,
    faults: HashMap<u32, VecDeque<Fault>>,
    opcodes: Vec<u8>,
}

pub(crate) struct FakeDisk {
    config: FakeConfig,
    state: Mutex<State>,
    next_nexus: AtomicU32,
}

type Answer = Result<(), (u8, Vec<u8>)>;

impl FakeDisk {
    pub fn new(config: FakeConfig) -> Arc<FakeDisk> {
        let len = (config.blocks * u64::from(config.logical_bytes)) as usize;
        Arc::new(FakeDisk {
            config,
            state: Mutex::new(State {
                data: vec![0; len],
                registrations: Vec::new(),
                reservation: None,
                attentions: HashMap::new(),
                faults: HashMap::new(),
                opcodes: Vec::new(),
            }),
            next_nexus: AtomicU32::new(1),
        })
    }

    /// A new initiator (I_T nexus) on this disk.
    pub fn connect(self: &Arc<Self>) -> FakeTransport {
        FakeTransport {
            disk: self.clone(),
            nexus: self.next_nexus.fetch_add(1, Ordering::Relaxed),
            max_transfer_bytes: 64 * 1024,
            reconnects: AtomicU32::new(0),
            fail_reconnect: false,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn inject(&self, nexus: u32, fault: Fault) {
        self.state()
            .faults
            .entry(nexus)
            .or_default()
            .push_back(fault);
    }

    pub fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.state().data[offset..offset + len].to_vec()
    }

    pub fn opcodes(&self) -> Vec<u8> {
        self.state().opcodes.clone()
    }

    pub fn sense(&self, key: u8, asc: u8, ascq: u8, info: Option<u64>) -> Vec<u8> {
        if self.config.descriptor_sense {
            let mut s = vec![0x72, key, asc, ascq, 0, 0, 0, 0];
            if let Some(info) = info {
                s.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
                s.extend_from_slice(&info.to_be_bytes());
            }
            s[7] = (s.len() - 8) as u8;
            s
        } else {
            let mut s = vec![0u8; 18];
            s[0] = 0x70 | if info.is_some() { 0x80 } else { 0 };
            s[2] = key;
            s[3..7].copy_from_slice(&(info.unwrap_or(0) as u32).to_be_bytes());
            s[7] = 10;
            s[12] = asc;
            s[13] = ascq;
            s
        }
    }

    fn check(&self, key: u8, asc: u8, ascq: u8) -> Answer {
        Err((STATUS_CHECK_CONDITION, self.sense(key, asc, ascq, None)))
    }

    fn execute(
        &self,
        nexus: u32,
        cdb: &[u8],
        data: DataDir<'_>,
    ) -> Result<ScsiStatus, TransportError> {
        let mut st = self.state();
        st.opcodes.push(cdb[0]);
        let fault = st.faults.get_mut(&nexus).and_then(|q| q.pop_front());
        let lose_after = match fault {
            Some(Fault::Reply(status, sense)) => return Ok(reply(status, sense)),
            Some(Fault::LostBefore) => {
                return Err(TransportError::ConnectionLost("injected".into()))
            }
            Some(Fault::LostAfter) => true,
            None => false,
        };
        let ua_exempt = cdb[0] == cdb::INQUIRY;
        if !ua_exempt {
            if let Some((asc, ascq)) = st.attentions.get_mut(&nexus).and_then(|q| q.pop_front()) {
                let sense = self.sense(sense::UNIT_ATTENTION, asc, ascq, None);
                return Ok(reply(STATUS_CHECK_CONDITION, sense));
            }
        }
        let answer = self.run(&mut st, nexus, cdb, data);
        if lose_after {
            return Err(TransportError::ConnectionLost(
                "injected after the command ran".into(),
            ));
        }
        Ok(match answer {
            Ok(()) => reply(STATUS_GOOD, Vec::new()),
            Err((status, sense)) => reply(status, sense),
        })
    }

    fn run(&self, st: &mut State, nexus: u32, cdb: &[u8], data: DataDir<'_>) -> Answer {
        let block = self.config.logical_bytes as usize;
        let lba = |c: &[u8]| u64::from_be_bytes(c[2..10].try_into().unwrap());
        match (cdb[0], data) {
            (cdb::READ_16, DataDir::In(buf)) => {
                let (at, len) = self.extent(lba(cdb), be32(&cdb[10..14]), buf.len())?;
                buf.copy_from_slice(&st.data[at..at + len]);
                Ok(())
            }
            (cdb::WRITE_16, DataDir::Out(buf)) => {
                self.may_write(st, nexus)?;
                let (at, len) = self.extent(lba(cdb), be32(&cdb[10..14]), buf.len())?;
                st.data[at..at + len].copy_from_slice(buf);
                Ok(())
            }
            (cdb::COMPARE_AND_WRITE, DataDir::Out(buf)) => {
                if !self.config.caw {
                    return self.check(sense::ILLEGAL_REQUEST, 0x20, 0);
                }
                self.may_write(st, nexus)?;
                let blocks = u32::from(cdb[13]);
                let (at, len) = self.extent(lba(cdb), blocks, buf.len() / 2)?;
                let (expected, new) = buf.split_at(len);
                let current = &st.data[at..at + len];
                let first = current.iter().zip(expected).position(|(a, b)| a != b);
                if let Some(first) = first.filter(|_| !self.config.compare_broken) {
                    let sense = self.sense(sense::MISCOMPARE, 0x1D, 0, Some(first as u64));
                    return Err((STATUS_CHECK_CONDITION, sense));
                }
                st.data[at..at + len].copy_from_slice(new);
                Ok(())
            }
            (cdb::SYNCHRONIZE_CACHE_16, DataDir::None) if self.config.sync16 => {
                self.may_write(st, nexus)
            }
            (cdb::SYNCHRONIZE_CACHE_10, DataDir::None) => self.may_write(st, nexus),
            (cdb::SERVICE_ACTION_IN_16, DataDir::In(buf)) if cdb[1] == cdb::SA_READ_CAPACITY_16 => {
                let mut r = [0u8; 32];
                r[0..8].copy_from_slice(&(self.config.blocks - 1).to_be_bytes());
                r[8..12].copy_from_slice(&self.config.logical_bytes.to_be_bytes());
                r[13] = self.config.physical_exponent;
                copy_out(buf, &r);
                Ok(())
            }
            (cdb::INQUIRY, DataDir::In(buf))
                if cdb[1] & 1 == 1 && cdb[2] == cdb::VPD_BLOCK_LIMITS =>
            {
                let Some(max) = self.config.max_caw_blocks else {
                    return self.check(sense::ILLEGAL_REQUEST, 0x24, 0);
                };
                let mut page = [0u8; 64];
                page[1] = cdb::VPD_BLOCK_LIMITS;
                page[3] = 0x3C;
                page[5] = max;
                copy_out(buf, &page);
                Ok(())
            }
            (cdb::MAINTENANCE_IN, DataDir::In(buf)) if self.config.rsoc && cdb[1] == 0x0C => {
                let supported = match cdb[3] {
                    cdb::COMPARE_AND_WRITE => self.config.caw,
                    _ => true,
                };
                let r = [0, if supported { 0b011 } else { 0b001 }, 0, 16];
                copy_out(buf, &r);
                Ok(())
            }
            (cdb::PERSISTENT_RESERVE_IN, DataDir::In(buf)) => {
                self.pr_in(st, cdb[1], buf);
                Ok(())
            }
            (cdb::PERSISTENT_RESERVE_OUT, DataDir::Out(buf)) => self.pr_out(st, nexus, cdb, buf),
            (cdb::TEST_UNIT_READY, DataDir::None) => Ok(()),
            _ => self.check(sense::ILLEGAL_REQUEST, 0x20, 0),
        }
        .map(|_| {
            let _ = block;
        })
    }

    /// Byte range of `blocks` blocks at `lba`, checked against the device and the
    /// buffer.
    fn extent(
        &self,
        lba: u64,
        blocks: u32,
        buf_len: usize,
    ) -> Result<(usize, usize), (u8, Vec<u8>)> {
        let block = u64::from(self.config.logical_bytes);
        if lba + u64::from(blocks) > self.config.blocks {
            return Err((
                STATUS_CHECK_CONDITION,
                self.sense(sense::ILLEGAL_REQUEST, 0x21, 0, None),
            ));
        }
        let len = (u64::from(blocks) * block) as usize;
        if len != buf_len {
            return Err((
                STATUS_CHECK_CONDITION,
                self.sense(sense::ILLEGAL_REQUEST, 0x24, 0, None),
            ));
        }
        Ok(((lba * block) as usize, len))
    }

    fn key_of(st: &State, nexus: u32) -> Option<u64> {
        st.registrations
            .iter()
            .find(|(n, _)| *n == nexus)
            .map(|(_, k)| *k)
    }

    /// Write Exclusive – Registrants Only: writes of unregistered initiators conflict.
    fn may_write(&self, st: &State, nexus: u32) -> Answer {
        match st.reservation {
            Some((holder, kind)) if holder != nexus && Self::key_of(st, nexus).is_none() => {
                let _ = kind;
                Err((STATUS_RESERVATION_CONFLICT, Vec::new()))
            }
            _ => Ok(()),
        }
    }

    fn pr_in(&self, st: &State, action: u8, buf: &mut [u8]) {
        let mut r = Vec::new();
        r.extend_from_slice(&7u32.to_be_bytes());
        match action {
            0 => {
                r.extend_from_slice(&((st.registrations.len() * 8) as u32).to_be_bytes());
                for (_, key) in &st.registrations {
                    r.extend_from_slice(&key.to_be_bytes());
                }
            }
            1 => match st.reservation {
                None => r.extend_from_slice(&0u32.to_be_bytes()),
                Some((holder, kind)) => {
                    r.extend_from_slice(&16u32.to_be_bytes());
                    r.extend_from_slice(&Self::key_of(st, holder).unwrap_or(0).to_be_bytes());
                    r.extend_from_slice(&[0, 0, 0, 0, 0, kind, 0, 0]);
                }
            },
            _ => r = vec![0, 8, 0x10, 0x80 | 0x10, 0xEA, 0x01, 0, 0],
        }
        copy_out(buf, &r);
    }

    fn pr_out(&self, st: &mut State, nexus: u32, cdb: &[u8], buf: &[u8]) -> Answer {
        let conflict = Err((STATUS_RESERVATION_CONFLICT, Vec::new()));
        let key = u64::from_be_bytes(buf[0..8].try_into().unwrap());
        let sa_key = u64::from_be_bytes(buf[8..16].try_into().unwrap());
        let kind = cdb[2] & 0x0F;
        let own = Self::key_of(st, nexus);
        match cdb[1] {
            0x00 | 0x06 => {
                if cdb[1] == 0x00 && own.unwrap_or(0) != key {
                    return conflict;
                }
                st.registrations.retain(|(n, _)| *n != nexus);
                if sa_key != 0 {
                    st.registrations.push((nexus, sa_key));
                } else if matches!(st.reservation, Some((h, _)) if h == nexus) {
                    st.reservation = None;
                }
                Ok(())
            }
            0x01 => {
                if own != Some(key) {
                    return conflict;
                }
                match st.reservation {
                    Some((h, k)) if h == nexus && k == kind => Ok(()),
                    Some(_) => conflict,
                    None => {
                        st.reservation = Some((nexus, kind));
                        Ok(())
                    }
                }
            }
            0x02 => {
                if own != Some(key) {
                    return conflict;
                }
                if matches!(st.reservation, Some((h, _)) if h == nexus) {
                    st.reservation = None;
                }
                Ok(())
            }
            0x05 if !self.config.preempt_abort => self.check(sense::ILLEGAL_REQUEST, 0x24, 0),
            0x04 | 0x05 => {
                if own != Some(key) {
                    return conflict;
                }
                if sa_key == 0 {
                    return self.check(sense::ILLEGAL_REQUEST, 0x26, 0);
                }
                let victims: Vec<u32> = st
                    .registrations
                    .iter()
                    .filter(|(_, k)| *k == sa_key)
                    .map(|(n, _)| *n)
                    .collect();
                if victims.is_empty() {
                    return conflict;
                }
                st.registrations.retain(|(_, k)| *k != sa_key);
                for v in &victims {
                    if *v != nexus {
                        st.attentions
                            .entry(*v)
                            .or_default()
                            .push_back(sense::ASC_REGISTRATIONS_PREEMPTED);
                    }
                }
                if matches!(st.reservation, Some((h, _)) if victims.contains(&h)) {
                    st.reservation = Some((nexus, kind));
                }
                Ok(())
            }
            _ => self.check(sense::ILLEGAL_REQUEST, 0x24, 0),
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn copy_out(buf: &mut [u8], r: &[u8]) {
    let n = buf.len().min(r.len());
    buf[..n].copy_from_slice(&r[..n]);
}

fn reply(status: u8, sense: Vec<u8>) -> ScsiStatus {
    ScsiStatus {
        status,
        sense,
        residual: 0,
    }
}

/// One initiator of a `FakeDisk`.
pub(crate) struct FakeTransport {
    pub disk: Arc<FakeDisk>,
    pub nexus: u32,
    pub max_transfer_bytes: usize,
    pub reconnects: AtomicU32,
    pub fail_reconnect: bool,
}

impl ScsiTransport for FakeTransport {
    fn execute(&self, cdb: &[u8], data: DataDir<'_>) -> Result<ScsiStatus, TransportError> {
        self.disk.execute(self.nexus, cdb, data)
    }
    fn reconnect(&self) -> Result<(), TransportError> {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        if self.fail_reconnect {
            return Err(TransportError::ConnectionLost("target unreachable".into()));
        }
        Ok(())
    }
    fn max_transfer_bytes(&self) -> usize {
        self.max_transfer_bytes
    }
    fn describe(&self) -> String {
        format!("fake SCSI disk (initiator {})", self.nexus)
    }
}
