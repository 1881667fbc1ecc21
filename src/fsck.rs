//! (being written)
use crate::lun::Lun;
