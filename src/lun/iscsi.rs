//! iSCSI LUNs through libiscsi, loaded at run time: `iscsi://[user[%pass]@]host[:port]/IQN/LUN`.
//!
//! libiscsi (`libiscsi.so.7`, Debian package `libiscsi7`) is opened with `dlopen`
//! on the first iSCSI open, so atsfs builds and runs without it for image files and
//! block devices. The FFI is the library's synchronous API; `ffi` holds the few C
//! structures atsfs reads, checked against the headers by a layout test.
//!
//! **Each open is its own initiator port**: its own session, with an initiator name
//! `iqn.2026-12.org.atsfs:host-<random>` (or `$ATSFS_ISCSI_INITIATOR`, for targets
//! with ACLs) and a random ISID. Persistent reservations are registered per I_T
//! nexus, so two opens in one process are two registrants.
//!
//! **One command at a time per session.** A libiscsi context is not thread safe;
//! `execute` holds the session's mutex for the whole command. One session carries
//! about one command per round trip; see docs/scsi.md for the numbers.
//!
//! **Lost connections.** libiscsi's own reconnect is turned off: it would re-send
//! queued commands behind the caller's back and log in with a new ISID (a new I_T
//! nexus, which loses the persistent reservation registration). Instead a command
//! that finds the connection gone fails with `ConnectionLost`; `ScsiLun` then calls
//! `reconnect`, which logs in again with the same initiator name and ISID (the
//! target reinstates the session: the old session's commands are ended and the
//! registration stays), and sends the command once more. Commands time out after
//! `COMMAND_TIMEOUT_S`.
//!
//! **Memory the library may still point to.** When a synchronous call returns
//! without its task (the event loop failed), libiscsi may still hold pointers to
//! that task and to the call's own stack frame, and destroying the context would
//! run callbacks into that stale frame. Such a context is disconnected (its socket
//! closed) and then leaked on purpose, with its task: a few KiB per lost connection.

use super::scsi::{DataDir, ScsiStatus, ScsiTransport, TransportError};
use super::{LunError, LunResult};
use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// The library's file name (SONAME of libiscsi 1.x).
const LIBRARY: &str = "libiscsi.so.7";
/// Seconds before libiscsi gives up on one command (its clock ticks in seconds).
const COMMAND_TIMEOUT_S: c_int = 10;
/// The largest data transfer of one command; libiscsi splits it into PDUs.
const MAX_TRANSFER_BYTES: usize = 1024 * 1024;
/// The initiator name prefix; a random suffix makes each open its own initiator.
const INITIATOR_PREFIX: &str = "iqn.2026-12.org.atsfs:host-";
/// Environment variable naming the initiator, for targets that check ACLs.
const INITIATOR_ENV: &str = "ATSFS_ISCSI_INITIATOR";

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub const MAX_STRING_SIZE: usize = 255;
    pub const ISCSI_SESSION_NORMAL: c_int = 2;
    pub const ISCSI_HEADER_DIGEST_NONE_CRC32C: c_int = 1;
    pub const SCSI_XFER_NONE: c_int = 0;
    pub const SCSI_XFER_READ: c_int = 1;
    pub const SCSI_XFER_WRITE: c_int = 2;
    pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
    pub const SCSI_STATUS_ERROR: c_int = 0x0f00_0001;
    pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;
    pub const SCSI_RESIDUAL_UNDERFLOW: c_int = 1;

    /// `struct iscsi_context`: opaque.
    #[repr(C)]
    pub struct Context {
        _opaque: [u8; 0],
    }

    /// `struct scsi_iovec` (same as `struct iovec`).
    #[repr(C)]
    pub struct Iovec {
        pub iov_base: *mut c_void,
        pub iov_len: usize,
    }

    /// `struct scsi_sense` (its three one-bit fields share the byte `bits`).
    #[repr(C)]
    pub struct Sense {
        pub error_type: u8,
        pub key: c_int,
        pub ascq: c_int,
        pub bits: u8,
        pub bit_pointer: u8,
        pub field_pointer: u16,
    }

    /// `struct scsi_data`.
    #[repr(C)]
    pub struct Data {
        pub size: c_int,
        pub data: *mut u8,
    }

    /// `struct scsi_iovector`.
    #[repr(C)]
    pub struct Iovector {
        pub iov: *mut Iovec,
        pub niov: c_int,
        pub nalloc: c_int,
        pub offset: usize,
        pub consumed: c_int,
    }

    /// `struct scsi_task` (scsi-lowlevel.h). atsfs only reads it; libiscsi allocates
    /// and frees it (`scsi_create_task`, `scsi_free_scsi_task`).
    #[repr(C)]
    pub struct Task {
        pub status: c_int,
        pub cdb_size: c_int,
        pub xfer_dir: c_int,
        pub expxferlen: c_int,
        pub cdb: [u8; 16],
        pub residual_status: c_int,
        pub residual: usize,
        pub sense: Sense,
        pub datain: Data,
        pub mem: *mut c_void,
        pub ptr: *mut c_void,
        pub itt: u32,
        pub cmdsn: u32,
        pub lun: u32,
        pub iovector_in: Iovector,
        pub iovector_out: Iovector,
    }

    /// `struct iscsi_url`.
    #[repr(C)]
    pub struct Url {
        pub portal: [c_char; MAX_STRING_SIZE + 1],
        pub target: [c_char; MAX_STRING_SIZE + 1],
        pub user: [c_char; MAX_STRING_SIZE + 1],
        pub passwd: [c_char; MAX_STRING_SIZE + 1],
        pub target_user: [c_char; MAX_STRING_SIZE + 1],
        pub target_passwd: [c_char; MAX_STRING_SIZE + 1],
        pub lun: c_int,
        pub iscsi: *mut Context,
        pub transport: c_int,
    }

    // Sizes on the 64-bit Linux ABI, from /usr/include/iscsi (libiscsi 1.19).
    #[cfg(target_pointer_width = "64")]
    const _: () = {
        assert!(std::mem::size_of::<Task>() == 176);
        assert!(std::mem::size_of::<Sense>() == 16);
        assert!(std::mem::size_of::<Url>() == 1560);
        assert!(std::mem::size_of::<Iovec>() == 16);
    };

    /// The functions atsfs calls, copied out of the loaded library. They stay valid
    /// for as long as `_library` is loaded, which is for ever (`API` is a static).
    pub struct Api {
        pub _library: libloading::Library,
        pub create_context: unsafe extern "C" fn(*const c_char) -> *mut Context,
        pub destroy_context: unsafe extern "C" fn(*mut Context) -> c_int,
        pub parse_full_url: unsafe extern "C" fn(*mut Context, *const c_char) -> *mut Url,
        pub destroy_url: unsafe extern "C" fn(*mut Url),
        pub get_error: unsafe extern "C" fn(*mut Context) -> *const c_char,
        pub set_targetname: unsafe extern "C" fn(*mut Context, *const c_char) -> c_int,
        pub set_session_type: unsafe extern "C" fn(*mut Context, c_int) -> c_int,
        pub set_header_digest: unsafe extern "C" fn(*mut Context, c_int) -> c_int,
        pub set_initiator_username_pwd:
            unsafe extern "C" fn(*mut Context, *const c_char, *const c_char) -> c_int,
        pub set_timeout: unsafe extern "C" fn(*mut Context, c_int) -> c_int,
        pub set_noautoreconnect: unsafe extern "C" fn(*mut Context, c_int),
        pub set_isid_random: unsafe extern "C" fn(*mut Context, u32, u32) -> c_int,
        pub full_connect_sync: unsafe extern "C" fn(*mut Context, *const c_char, c_int) -> c_int,
        pub disconnect: unsafe extern "C" fn(*mut Context) -> c_int,
        pub logout_sync: unsafe extern "C" fn(*mut Context) -> c_int,
        pub create_task: unsafe extern "C" fn(c_int, *mut u8, c_int, c_int) -> *mut Task,
        pub free_task: unsafe extern "C" fn(*mut Task),
        pub task_set_iov_in: unsafe extern "C" fn(*mut Task, *mut Iovec, c_int),
        pub task_set_iov_out: unsafe extern "C" fn(*mut Task, *mut Iovec, c_int),
        pub command_sync:
            unsafe extern "C" fn(*mut Context, c_int, *mut Task, *mut c_void) -> *mut Task,
    }

    /// Looks up `name` in `library` as a function of type `F`.
    ///
    /// # Safety
    /// `F` must be the C type of the symbol `name`.
    unsafe fn symbol<F: Copy>(library: &libloading::Library, name: &str) -> Result<F, String> {
        // SAFETY: the caller names the symbol's C type; the copied pointer is only used
        // while the library stays loaded (Api keeps it, and Api lives in a static).
        unsafe { library.get::<F>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{name}: {e}"))
    }

    impl Api {
        pub fn load(file: &str) -> Result<Api, String> {
            // SAFETY: loading libiscsi runs its ELF constructors; it has none that
            // touch process state atsfs relies on.
            let library = unsafe { libloading::Library::new(file) }.map_err(|e| e.to_string())?;
            // SAFETY: each type below is transcribed from iscsi.h / scsi-lowlevel.h
            // of libiscsi 1.19 (the ABI of SONAME libiscsi.so.7).
            unsafe {
                Ok(Api {
                    create_context: symbol(&library, "iscsi_create_context")?,
                    destroy_context: symbol(&library, "iscsi_destroy_context")?,
                    parse_full_url: symbol(&library, "iscsi_parse_full_url")?,
                    destroy_url: symbol(&library, "iscsi_destroy_url")?,
                    get_error: symbol(&library, "iscsi_get_error")?,
                    set_targetname: symbol(&library, "iscsi_set_targetname")?,
                    set_session_type: symbol(&library, "iscsi_set_session_type")?,
                    set_header_digest: symbol(&library, "iscsi_set_header_digest")?,
                    set_initiator_username_pwd: symbol(
                        &library,
                        "iscsi_set_initiator_username_pwd",
                    )?,
                    set_timeout: symbol(&library, "iscsi_set_timeout")?,
                    set_noautoreconnect: symbol(&library, "iscsi_set_noautoreconnect")?,
                    set_isid_random: symbol(&library, "iscsi_set_isid_random")?,
                    full_connect_sync: symbol(&library, "iscsi_full_connect_sync")?,
                    disconnect: symbol(&library, "iscsi_disconnect")?,
                    logout_sync: symbol(&library, "iscsi_logout_sync")?,
                    create_task: symbol(&library, "scsi_create_task")?,
                    free_task: symbol(&library, "scsi_free_scsi_task")?,
                    task_set_iov_in: symbol(&library, "scsi_task_set_iov_in")?,
                    task_set_iov_out: symbol(&library, "scsi_task_set_iov_out")?,
                    command_sync: symbol(&library, "iscsi_scsi_command_sync")?,
                    _library: library,
                })
            }
        }
    }
}

static API: OnceLock<Result<ffi::Api, String>> = OnceLock::new();

/// The loaded library, or why it is not there.
fn api(device: &str) -> LunResult<&'static ffi::Api> {
    match API.get_or_init(|| ffi::Api::load(LIBRARY)) {
        Ok(api) => Ok(api),
        Err(why) => Err(missing_library(device, why)),
    }
}

fn missing_library(device: &str, why: &str) -> LunError {
    LunError::Open {
        device: device.to_string(),
        detail: format!(
            "iSCSI needs libiscsi: apt-get install libiscsi7 (Debian/Ubuntu) or dnf install \
             libiscsi ({LIBRARY}: {why})"
        ),
    }
}

/// A C string from a fixed `char[N]` field (bounded by N; no terminator needed).
fn field(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What an `iscsi://` URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    portal: String,
    iqn: String,
    lun: c_int,
    user: String,
    password: String,
}

/// The URL with any password left out, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(rest) = url.strip_prefix("iscsi://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split('%').next().unwrap_or("");
            format!("iscsi://{user}@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

fn cstring(device: &str, what: &str, value: &str) -> LunResult<CString> {
    CString::new(value).map_err(|_| LunError::Open {
        device: device.to_string(),
        detail: format!("the {what} contains a NUL byte"),
    })
}

/// The initiator name for a new open.
fn initiator_name() -> String {
    match std::env::var(INITIATOR_ENV) {
        Ok(name) if !name.is_empty() => name,
        _ => format!("{INITIATOR_PREFIX}{}", uuid::Uuid::new_v4().simple()),
    }
}

/// A libiscsi context, used under `IscsiTransport::session`'s mutex only.
struct Session {
    ctx: *mut ffi::Context,
}

// SAFETY: a libiscsi context has no thread affinity; it must only not be used by two
// threads at once, which the Mutex around every Session guarantees.
unsafe impl Send for Session {}

/// An iSCSI logical unit, one session.
pub struct IscsiTransport {
    api: &'static ffi::Api,
    /// The URL without password, for messages.
    shown: String,
    target: Target,
    initiator: CString,
    isid: u32,
    /// `None` after a lost connection until `reconnect` logs in again.
    session: Mutex<Option<Session>>,
}

impl IscsiTransport {
    /// Logs in to the target and LUN that `url` names, as a new initiator.
    pub fn connect(url: &str) -> LunResult<IscsiTransport> {
        let shown = redact_url(url);
        let api = api(&shown)?;
        let initiator = cstring(&shown, "initiator name", &initiator_name())?;
        let target = parse_url(api, &shown, url, &initiator)?;
        let transport = IscsiTransport {
            api,
            shown,
            target,
            initiator,
            isid: rand::random::<u32>() & 0x00FF_FFFF,
            session: Mutex::new(None),
        };
        let session = transport.login().map_err(|detail| LunError::Open {
            device: transport.shown.clone(),
            detail,
        })?;
        *transport.lock() = Some(session);
        Ok(transport)
    }

    /// The initiator name this open logged in with.
    pub fn initiator(&self) -> String {
        self.initiator.to_string_lossy().into_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error_text(&self, ctx: *mut ffi::Context) -> String {
        // SAFETY: ctx is a live context; iscsi_get_error returns a NUL-terminated
        // string owned by the context (or NULL), copied out at once.
        unsafe {
            let text = (self.api.get_error)(ctx);
            if text.is_null() {
                return "unknown libiscsi error".into();
            }
            CStr::from_ptr(text)
                .to_string_lossy()
                .trim_end()
                .to_string()
        }
    }

    /// A new context logged in to the LUN, with this open's initiator name and ISID.
    fn login(&self) -> Result<Session, String> {
        let t = &self.target;
        let iqn = CString::new(t.iqn.as_str()).map_err(|e| e.to_string())?;
        let portal = CString::new(t.portal.as_str()).map_err(|e| e.to_string())?;
        let user = CString::new(t.user.as_str()).map_err(|e| e.to_string())?;
        let password = CString::new(t.password.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: every pointer passed is a live NUL-terminated string or the context
        // just created; libiscsi copies the strings it keeps.
        unsafe {
            let ctx = (self.api.create_context)(self.initiator.as_ptr());
            if ctx.is_null() {
                return Err("libiscsi could not create a context".into());
            }
            (self.api.set_isid_random)(ctx, self.isid, 0);
            (self.api.set_targetname)(ctx, iqn.as_ptr());
            (self.api.set_session_type)(ctx, ffi::ISCSI_SESSION_NORMAL);
            (self.api.set_header_digest)(ctx, ffi::ISCSI_HEADER_DIGEST_NONE_CRC32C);
            if !t.user.is_empty() {
                (self.api.set_initiator_username_pwd)(ctx, user.as_ptr(), password.as_ptr());
            }
            (self.api.set_timeout)(ctx, COMMAND_TIMEOUT_S);
            (self.api.set_noautoreconnect)(ctx, 1);
            if (self.api.full_connect_sync)(ctx, portal.as_ptr(), t.lun) != 0 {
                let why = self.error_text(ctx);
                (self.api.destroy_context)(ctx);
                return Err(format!(
                    "login to {} LUN {} at {} failed: {why} (is the target running, the IQN and \
                     LUN right, and this initiator allowed by its ACL? set {INITIATOR_ENV} to \
                     choose the initiator name)",
                    t.iqn, t.lun, t.portal
                ));
            }
            Ok(Session { ctx })
        }
    }

    /// Drops a session whose library state is sound: log out (only from a healthy
    /// session: libiscsi's synchronous logout may wait for ever on a dead socket),
    /// destroy.
    fn close(&self, session: Session, logout: bool) {
        // SAFETY: no command is in flight on ctx (we hold the session by value, taken
        // from under the mutex), so destroying it runs no callback into a stale frame.
        unsafe {
            if logout {
                (self.api.logout_sync)(session.ctx);
            }
            (self.api.destroy_context)(session.ctx);
        }
    }

    /// Abandons a session the library may still hold stale pointers into (see the
    /// module docs): close its socket, never free it.
    fn abandon(&self, session: Session) {
        // SAFETY: iscsi_disconnect only closes the socket and resets connection flags;
        // it runs no callbacks. The context is then never touched again.
        unsafe {
            (self.api.disconnect)(session.ctx);
        }
        // Session has no Drop: letting it go leaks the context, on purpose.
        let _leaked = session.ctx;
    }

    /// Runs one command on `ctx`. `Err(true)` in the error means the context must be
    /// abandoned rather than closed.
    fn command(
        &self,
        ctx: *mut ffi::Context,
        cdb: &[u8],
        data: DataDir<'_>,
    ) -> Result<ScsiStatus, (TransportError, bool)> {
        let not_sent = |m: &str| (TransportError::NotSent(m.to_string()), false);
        let (dir, len, base) = match data {
            DataDir::None => (ffi::SCSI_XFER_NONE, 0usize, std::ptr::null_mut()),
            DataDir::In(buf) => (ffi::SCSI_XFER_READ, buf.len(), buf.as_mut_ptr()),
            // libiscsi only reads a data-out buffer; the cast to *mut is its C API.
            DataDir::Out(buf) => (ffi::SCSI_XFER_WRITE, buf.len(), buf.as_ptr() as *mut u8),
        };
        let expxferlen = c_int::try_from(len).map_err(|_| not_sent("transfer too large"))?;
        if cdb.len() > 16 {
            return Err(not_sent("CDB longer than 16 bytes"));
        }
        let mut cdb_copy = [0u8; 16];
        cdb_copy[..cdb.len()].copy_from_slice(cdb);
        let mut iov = ffi::Iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the task is created and freed by libiscsi; `iov` and the buffer it
        // points to outlive the synchronous call that uses them; a task the call did
        // not hand back is leaked with its context (`abandon`), never freed.
        unsafe {
            let task =
                (self.api.create_task)(cdb.len() as c_int, cdb_copy.as_mut_ptr(), dir, expxferlen);
            if task.is_null() {
                return Err(not_sent("libiscsi could not allocate a task"));
            }
            match dir {
                ffi::SCSI_XFER_READ => (self.api.task_set_iov_in)(task, &mut iov, 1),
                ffi::SCSI_XFER_WRITE => (self.api.task_set_iov_out)(task, &mut iov, 1),
                _ => {}
            }
            let done = (self.api.command_sync)(ctx, self.target.lun, task, std::ptr::null_mut());
            if done.is_null() {
                let why = self.error_text(ctx);
                return Err((TransportError::ConnectionLost(why), true));
            }
            let result = self.task_result(ctx, &*done);
            (self.api.free_task)(done);
            result.map_err(|e| (e, false))
        }
    }

    /// The status of a finished task.
    fn task_result(
        &self,
        ctx: *mut ffi::Context,
        task: &ffi::Task,
    ) -> Result<ScsiStatus, TransportError> {
        match task.status {
            ffi::SCSI_STATUS_TIMEOUT => {
                return Err(TransportError::Timeout(format!(
                    "no reply in {COMMAND_TIMEOUT_S} s: {}",
                    self.error_text(ctx)
                )))
            }
            ffi::SCSI_STATUS_CANCELLED | ffi::SCSI_STATUS_ERROR => {
                return Err(TransportError::ConnectionLost(self.error_text(ctx)))
            }
            status if !(0..=0xFF).contains(&status) => {
                return Err(TransportError::ConnectionLost(format!(
                    "libiscsi status {status:#x}: {}",
                    self.error_text(ctx)
                )))
            }
            _ => {}
        }
        let mut sense = Vec::new();
        let size = usize::try_from(task.datain.size).unwrap_or(0);
        if task.status == i32::from(super::scsi::STATUS_CHECK_CONDITION)
            && !task.datain.data.is_null()
            && size >= 2
        {
            // SAFETY: on CHECK CONDITION libiscsi stores the sense segment (2-byte
            // length, then the sense bytes) in datain: `size` bytes at `data`.
            let segment = unsafe { std::slice::from_raw_parts(task.datain.data, size) };
            // SenseLength is big endian, as every iSCSI field (RFC 7143 10.4.7.1).
            let declared = usize::from(segment[0]) << 8 | usize::from(segment[1]);
            sense = segment[2..].iter().take(declared).copied().collect();
        }
        let residual = if task.residual_status == ffi::SCSI_RESIDUAL_UNDERFLOW {
            task.residual
        } else {
            0
        };
        Ok(ScsiStatus {
            status: task.status as u8,
            sense,
            residual,
        })
    }
}

fn parse_url(api: &ffi::Api, shown: &str, url: &str, initiator: &CString) -> LunResult<Target> {
    let c_url = cstring(shown, "URL", url)?;
    let bad = |detail: String| LunError::Open {
        device: shown.to_string(),
        detail,
    };
    // SAFETY: a scratch context only for parsing; the url struct is read and then
    // freed before the context is destroyed.
    unsafe {
        let ctx = (api.create_context)(initiator.as_ptr());
        if ctx.is_null() {
            return Err(bad("libiscsi could not create a context".into()));
        }
        let parsed = (api.parse_full_url)(ctx, c_url.as_ptr());
        if parsed.is_null() {
            let text = (api.get_error)(ctx);
            let why = if text.is_null() {
                String::new()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            };
            (api.destroy_context)(ctx);
            return Err(bad(format!(
                "not an iSCSI URL ({why}); the form is iscsi://[user[%password]@]host[:port]/IQN/LUN"
            )));
        }
        let u = &*parsed;
        let target = Target {
            portal: field(&u.portal),
            iqn: field(&u.target),
            lun: u.lun,
            user: field(&u.user),
            password: field(&u.passwd),
        };
        (api.destroy_url)(parsed);
        (api.destroy_context)(ctx);
        Ok(target)
    }
}

impl ScsiTransport for IscsiTransport {
    fn execute(&self, cdb: &[u8], data: DataDir<'_>) -> Result<ScsiStatus, TransportError> {
        let mut guard = self.lock();
        let Some(session) = guard.as_ref() else {
            return Err(TransportError::ConnectionLost("not logged in".into()));
        };
        match self.command(session.ctx, cdb, data) {
            Ok(status) => Ok(status),
            Err((e @ TransportError::NotSent(_), _)) => Err(e),
            Err((e, stale)) => {
                // The session is unusable (gone, or a command of unknown fate is still
                // with the target): drop it; the next command needs a reconnect.
                if let Some(session) = guard.take() {
                    if stale {
                        self.abandon(session);
                    } else {
                        self.close(session, false);
                    }
                }
                Err(e)
            }
        }
    }

    fn reconnect(&self) -> Result<(), TransportError> {
        let mut guard = self.lock();
        if let Some(old) = guard.take() {
            self.close(old, false);
        }
        let session = self.login().map_err(TransportError::ConnectionLost)?;
        tracing::info!(device = %self.shown, "logged in again (same initiator port)");
        *guard = Some(session);
        Ok(())
    }

    fn max_transfer_bytes(&self) -> usize {
        MAX_TRANSFER_BYTES
    }

    fn describe(&self) -> String {
        format!("iSCSI LUN {}", self.shown)
    }
}

impl Drop for IscsiTransport {
    fn drop(&mut self) {
        if let Some(session) = self.lock().take() {
            self.close(session, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redact_url("iscsi://alice%secret@10.0.0.1:3260/iqn.x:y/1"),
            "iscsi://alice@10.0.0.1:3260/iqn.x:y/1"
        );
        assert_eq!(redact_url("iscsi://h/iqn.x:y@z/1"), "iscsi://h/iqn.x:y@z/1");
        assert_eq!(redact_url("/dev/sda"), "/dev/sda");
    }

    #[test]
    fn a_missing_library_says_what_to_install() {
        let Err(why) = ffi::Api::load("libiscsi-not-here.so.7") else {
            panic!("loaded a library that does not exist");
        };
        let err = missing_library("iscsi://h/iqn.x:y/1", &why);
        let text = err.to_string();
        assert!(
            text.contains("iSCSI needs libiscsi: apt-get install libiscsi7"),
            "{text}"
        );
        assert_eq!(err.errno(), libc::ENODEV);
    }

    #[test]
    fn each_open_gets_its_own_initiator_name() {
        if std::env::var(INITIATOR_ENV).is_ok() {
            return;
        }
        let (a, b) = (initiator_name(), initiator_name());
        assert_ne!(a, b);
        assert!(a.starts_with(INITIATOR_PREFIX));
    }

    /// The Rust mirrors of libiscsi's structs against the C compiler's view of the
    /// installed headers (skipped where there is no compiler or no libiscsi-dev).
    #[test]
    fn struct_layouts_match_the_headers() {
        let header = std::path::Path::new("/usr/include/iscsi/scsi-lowlevel.h");
        if !header.exists() {
            eprintln!("skipped: no /usr/include/iscsi (apt-get install libiscsi-dev)");
            return;
        }
        let Some(c) = crate::lun::c_program_output(
            r#"#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
#define T struct scsi_task
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(T),
    offsetof(T, status), offsetof(T, cdb_size), offsetof(T, xfer_dir), offsetof(T, expxferlen),
    offsetof(T, cdb), offsetof(T, residual_status), offsetof(T, residual), offsetof(T, sense),
    offsetof(T, datain), offsetof(T, mem), offsetof(T, lun), offsetof(T, iovector_in),
    offsetof(T, iovector_out));
  printf("%zu %zu %zu %zu %zu\n", sizeof(struct scsi_sense), offsetof(struct scsi_sense, key),
    offsetof(struct scsi_sense, ascq), offsetof(struct scsi_sense, bit_pointer),
    offsetof(struct scsi_sense, field_pointer));
  printf("%zu %zu %zu %zu %zu %zu\n", sizeof(struct iscsi_url), offsetof(struct iscsi_url, target),
    offsetof(struct iscsi_url, passwd), offsetof(struct iscsi_url, lun),
    offsetof(struct iscsi_url, iscsi), offsetof(struct iscsi_url, transport));
  printf("%zu %zu %zu\n", sizeof(struct scsi_iovec), sizeof(struct scsi_iovector), sizeof(struct scsi_data));
  return 0;
}
"#,
        ) else {
            eprintln!("skipped: no C compiler to check the layout with");
            return;
        };
        use ffi::{Iovec, Iovector, Sense, Task, Url};
        let rust = format!(
            "{} {} {} {} {} {} {} {} {} {} {} {} {} {}\n{} {} {} {} {}\n{} {} {} {} {} {}\n{} {} {}\n",
            size_of::<Task>(),
            offset_of!(Task, status),
            offset_of!(Task, cdb_size),
            offset_of!(Task, xfer_dir),
            offset_of!(Task, expxferlen),
            offset_of!(Task, cdb),
            offset_of!(Task, residual_status),
            offset_of!(Task, residual),
            offset_of!(Task, sense),
            offset_of!(Task, datain),
            offset_of!(Task, mem),
            offset_of!(Task, lun),
            offset_of!(Task, iovector_in),
            offset_of!(Task, iovector_out),
            size_of::<Sense>(),
            offset_of!(Sense, key),
            offset_of!(Sense, ascq),
            offset_of!(Sense, bit_pointer),
            offset_of!(Sense, field_pointer),
            size_of::<Url>(),
            offset_of!(Url, target),
            offset_of!(Url, passwd),
            offset_of!(Url, lun),
            offset_of!(Url, iscsi),
            offset_of!(Url, transport),
            size_of::<Iovec>(),
            size_of::<Iovector>(),
            size_of::<ffi::Data>(),
        );
        assert_eq!(rust, c);
    }
}
