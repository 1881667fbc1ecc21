//! The guest image, built from the unpacked kernel package, busybox-static and the
//! project's own static build each run:
//!
//! - `vmlinux`: the uncompressed kernel, cut out of Debian's bzImage (the payload the
//!   setup header points at, decompressed by xz), so QEMU boots it by its PVH entry
//!   (`-kernel vmlinux`), about twice as fast as the bzImage under TCG;
//! - `initramfs.cpio.gz`: a cpio (newc) archive of busybox, the kernel modules the
//!   guests need with everything they depend on (read from each module's `.modinfo`,
//!   loaded in dependency order by /init), the statically linked `atsfs` and
//!   `mkfs.atsfs`, /init and the scenario's step functions.

use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The modules the guests load, by name: virtio PCI and SCSI (the LUN through
/// `scsi-block`), sd and sg (/dev/sda, /dev/sg0), virtio-blk (a plain shared virtio
/// disk), FUSE, and virtio-rng: a PVH boot gets no random seed from QEMU, and
/// without a source the kernel's random pool stayed uninitialised under TCG: an idle
/// guest's `atsfs mount` blocked in getrandom() (its host UUID) for over a minute.
pub const MODULES: [&str; 7] = [
    "virtio_pci",
    "virtio_scsi",
    "sd_mod",
    "sg",
    "virtio_blk",
    "fuse",
    "virtio_rng",
];

/// The guest's /init and the scenario's step functions (shell, run by busybox).
const INIT: &str = include_str!("../../vm/init.sh");
const STEPS: &str = include_str!("../../vm/steps.sh");

/// True when `elf` is an ELF executable without a program interpreter (PT_INTERP):
/// it runs without any shared library.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only (x86_64).
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        u32_at(at).is_some_and(|kind| kind != PT_INTERP)
    })
}

/// Cuts the compressed kernel out of a bzImage and decompresses it into `vmlinux`.
pub fn extract_vmlinux(vmlinuz: &Path, vmlinux: &Path) -> Result<()> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let payload = bzimage_payload(&image)
        .with_context(|| format!("{} is not a bzImage with a payload", vmlinuz.display()))?;
    let tool = match payload.get(..6) {
        Some(b"\xfd7zXZ\x00") => ["xz", "-dc", "--single-stream"],
        Some([0x1f, 0x8b, ..]) => ["gzip", "-dc", "-q"],
        Some([0x28, 0xb5, 0x2f, 0xfd, ..]) => ["zstd", "-dcq", "--no-check"],
        _ => bail!(
            "{}: the payload's compression is not xz, gzip or zstd",
            vmlinuz.display()
        ),
    };
    let packed = vmlinux.with_extension("payload");
    std::fs::write(&packed, payload).with_context(|| format!("writing {}", packed.display()))?;
    let out = std::fs::File::create(vmlinux)
        .with_context(|| format!("creating {}", vmlinux.display()))?;
    let mut cmd = Cmd::new(tool[0])
        .args(&tool[1..])
        .arg(&packed)
        .into_command();
    // A kernel's payload may carry bytes after its stream (its size, for the boot
    // decompressor); gzip warns about them and exits 2.
    let status = cmd
        .stdout(out)
        .status()
        .context("running the decompressor")?;
    std::fs::remove_file(&packed).ok();
    let elf = std::fs::read(vmlinux).unwrap_or_default();
    if !(status.success() || status.code() == Some(2))
        || elf.get(..4) != Some(b"\x7fELF".as_slice())
    {
        bail!(
            "decompressing the kernel of {} gave no ELF ({status})",
            vmlinuz.display()
        );
    }
    Ok(())
}

/// The compressed payload of a bzImage: `payload_offset` and `payload_length` of the
/// setup header (boot protocol 2.08+), counted from the protected-mode code, which
/// starts after the boot sector and `setup_sects` sectors.
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    image.get(start..start + u32_at(0x24c)?)
}

/// The `.ko` files to load for `wanted`, dependencies first, from an unpacked
/// modules directory (`lib/modules/RELEASE`). Modules built into the kernel are
/// skipped. Names compare with `-` and `_` alike, as the kernel's do.
pub fn module_closure(modules: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let normal = |name: &str| name.replace('-', "_");
    let mut by_name = BTreeMap::new();
    for line in read_lines(&modules.join("modules.order"))? {
        let path = modules.join(line.trim());
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            by_name.insert(normal(stem), path.clone());
        }
    }
    let builtin: HashSet<String> = read_lines(&modules.join("modules.builtin"))?
        .iter()
        .filter_map(|l| Path::new(l.trim()).file_stem()?.to_str().map(normal))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        visit(&normal(name), &by_name, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// Depth-first: a module's dependencies go into `order` before the module.
fn visit(
    name: &str,
    by_name: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    const DEPTH_MAX: usize = 32;
    if depth > DEPTH_MAX {
        bail!("module dependencies deeper than {DEPTH_MAX} at {name}: a cycle?");
    }
    if builtin.contains(name) || !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = by_name
        .get(name)
        .with_context(|| format!("no kernel module {name} in modules.order"))?;
    let ko = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    for dep in modinfo_depends(&ko) {
        visit(
            &dep.replace('-', "_"),
            by_name,
            builtin,
            seen,
            order,
            depth + 1,
        )?;
    }
    order.push(path.clone());
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated key=value
/// strings), split at commas.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = &ko[at + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Builds `atsfs` and `mkfs-atsfs` statically linked (glibc with `crt-static`, for the
/// host's own target so that build scripts and proc macros stay dynamic), in release
/// mode without debug info; returns their directory. Their own target directory
/// (TARGET/x86_64-unknown-linux-gnu) leaves the usual builds untouched.
pub fn build_static() -> Result<PathBuf> {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    sh::cargo()
        .args(["build", "--release", "--target", TRIPLE])
        .args(["-p", "atsfs", "-p", "mkfs-atsfs"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .current_dir(&sh::workspace_root()?)
        .run()?;
    let dir = sh::target_dir()?.join(TRIPLE).join("release");
    for program in ["atsfs", "mkfs-atsfs"] {
        let elf = std::fs::read(dir.join(program)).with_context(|| format!("reading {program}"))?;
        if !is_static_elf(&elf) {
            bail!("{program} built with crt-static still wants a program interpreter");
        }
    }
    Ok(dir)
}

/// What goes into the initramfs.
pub struct Contents<'a> {
    pub busybox: &'a Path,
    pub modules: &'a [PathBuf],
    /// The directory holding the static `atsfs` and `mkfs-atsfs`.
    pub binaries: &'a Path,
}

/// Writes the initramfs (cpio newc, gzip) to `out`.
pub fn build(contents: &Contents<'_>, out: &Path) -> Result<()> {
    let mut archive = Cpio::default();
    for dir in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "mnt",
        "lib",
        "lib/modules",
        "var",
    ] {
        archive.dir(dir);
    }
    archive.file("init", INIT.as_bytes(), 0o755);
    archive.file("steps.sh", STEPS.as_bytes(), 0o644);
    archive.file("bin/busybox", &read(contents.busybox)?, 0o755);
    archive.file(
        "sbin/atsfs",
        &read(&contents.binaries.join("atsfs"))?,
        0o755,
    );
    archive.file(
        "sbin/mkfs.atsfs",
        &read(&contents.binaries.join("mkfs-atsfs"))?,
        0o755,
    );
    let mut load_order = String::new();
    for module in contents.modules {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .context("module name")?;
        archive.file(&format!("lib/modules/{name}"), &read(module)?, 0o644);
        load_order.push_str(name);
        load_order.push('\n');
    }
    archive.file("lib/modules/load-order", load_order.as_bytes(), 0o644);
    let cpio = out.with_extension("");
    std::fs::write(&cpio, archive.finish())
        .with_context(|| format!("writing {}", cpio.display()))?;
    let gz = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let status = Cmd::new("gzip")
        .args(["-c", "-n"])
        .arg(&cpio)
        .quiet()
        .into_command()
        .stdout(gz)
        .status()
        .context("running gzip")?;
    if !status.success() {
        bail!("gzip of {} failed ({status})", cpio.display());
    }
    std::fs::remove_file(&cpio).ok();
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A cpio archive in the "newc" format the kernel unpacks: per entry a 110-byte ASCII
/// header (magic 070701 and 13 fields of 8 hex digits), the NUL-terminated name and
/// the data, each padded to 4 bytes; a `TRAILER!!!` entry ends it. Owner root.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let name_size = name.len() + 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            0,
            0,
            u32::try_from(name_size).unwrap_or(u32::MAX),
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() & 3 != 0 {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut archive = Cpio::default();
        archive.dir("bin");
        archive.file("bin/x", b"hello", 0o755);
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // Header 110 + "bin\0" = 114, padded to 116.
        assert_eq!(&bytes[116..122], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        // The file's size field (the 7th) is 5.
        assert_eq!(&bytes[116 + 6 + 6 * 8..116 + 6 + 7 * 8], b"00000005");
    }

    #[test]
    fn modinfo_depends_are_split() {
        let ko = b"junk\0license=GPL\0depends=scsi_mod,t10-pi\0name=sd_mod\0";
        assert_eq!(modinfo_depends(ko), ["scsi_mod", "t10-pi"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn a_bzimage_payload_is_found_from_the_setup_header() {
        let mut image = vec![0u8; 0x1000];
        image[0x1f1] = 1; // one setup sector: code at 1024
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&4u32.to_le_bytes());
        image[1040..1044].copy_from_slice(b"PAYL");
        assert_eq!(bzimage_payload(&image), Some(b"PAYL".as_slice()));
        assert_eq!(bzimage_payload(&[0u8; 16]), None);
    }

    #[test]
    fn static_elves_have_no_interpreter() {
        let this = std::fs::read("/proc/self/exe").expect("own binary");
        // The test binary is linked dynamically.
        assert!(!is_static_elf(&this));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
