//! Tracepoint record layouts as the *running* kernel describes them.
//!
//! The eBPF programs read raw tracepoint records, whose layout changes between kernel
//! versions (e.g. `kmem:kmalloc.gfp_flags` is a 4-byte `gfp_t` on 5.10 and an 8-byte
//! `unsigned long` on 6.1+; `kmem_cache_alloc` has a `name` field on 6.18 but not on 6.12).
//! Hard-coding offsets would silently read garbage on another kernel, so userspace reads
//! `events/<system>/<event>/format` from tracefs and hands the offsets to the programs.
//! GFP bits are not ABI either (they have been renumbered before), so their values are taken
//! from the `__print_flags` table in the `print fmt` line instead of compiled-in constants.

mod cexpr;
mod format;
mod print_flags;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use format::{EventFormat, FormatError};

/// Where tracefs is usually found: the dedicated mount point (4.1+), then the debugfs
/// automount that older setups rely on.
const WELL_KNOWN_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

const MOUNT_HINT: &str = "as root run `mount -t tracefs nodev /sys/kernel/tracing` \
     (leaktrace does this itself when started as root; in a container, bind-mount the host's \
     /sys/kernel/tracing or run it privileged)";

/// A tracefs mount (or a directory laid out like one, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Find a mounted tracefs (/sys/kernel/tracing, /sys/kernel/debug/tracing, or any tracefs
    /// in /proc/self/mounts); if none is mounted and we are root, mount tracefs at
    /// /sys/kernel/tracing; otherwise an actionable error (what to run).
    pub fn locate_or_mount() -> Result<Tracefs, FormatError> {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut candidates: Vec<PathBuf> = WELL_KNOWN_ROOTS.iter().map(PathBuf::from).collect();
        candidates.extend(tracefs_mount_points(&mounts));
        if let Some(root) = locate(&candidates)? {
            return Ok(Tracefs::at(root));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(FormatError::NoTracefs {
                reason: "tracefs is not mounted and leaktrace is not running as root".into(),
                hint: MOUNT_HINT.into(),
            });
        }
        mount_tracefs().map(Tracefs::at)
    }

    pub fn at(root: impl Into<PathBuf>) -> Tracefs {
        Tracefs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    // Part of the API for probe selection; the binary does not call it everywhere it is built.
    #[allow(dead_code)]
    pub fn has_event(&self, system: &str, name: &str) -> bool {
        self.format_path(system, name)
            .is_ok_and(|path| path.is_file())
    }

    /// Ok(None) when the event does not exist on this kernel.
    pub fn event_format(
        &self,
        system: &str,
        name: &str,
    ) -> Result<Option<EventFormat>, FormatError> {
        let path = self.format_path(system, name)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(FormatError::Io { path, error }),
        };
        EventFormat::parse(system, name, &text).map(Some)
    }

    /// Rejects names that would leave `events/` so that a bad name is an error, not a read of
    /// some other file.
    fn format_path(&self, system: &str, name: &str) -> Result<PathBuf, FormatError> {
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\0']);
        if !plain(system) || !plain(name) {
            return Err(FormatError::InvalidName {
                system: system.to_string(),
                name: name.to_string(),
            });
        }
        Ok(self
            .root
            .join("events")
            .join(system)
            .join(name)
            .join("format"))
    }
}

/// Mount points of filesystems of type tracefs in /proc/self/mounts text.
fn tracefs_mount_points(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let (_source, target, fstype) = (cols.next()?, cols.next()?, cols.next()?);
            (fstype == "tracefs").then(|| PathBuf::from(unescape_mount_path(target)))
        })
        .collect()
}

/// /proc/self/mounts writes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first candidate that is a usable tracefs root. A root we may not read is reported
/// rather than skipped: "not mounted" would send the user to fix the wrong thing.
/// A tracefs already mounted at one of the usual places under `root` (`/` on
/// a live node), found the way [`Tracefs::locate_or_mount`] finds one but
/// never mounting: the place as the node names it, None when none is mounted,
/// or the first place that could not be read and why (not root).
pub fn find_mounted(root: &Path) -> Result<Option<&'static str>, (&'static str, io::Error)> {
    let mut denied = None;
    for place in WELL_KNOWN_ROOTS {
        match probe(&root.join(place.trim_start_matches('/'))) {
            Ok(true) => return Ok(Some(place)),
            Ok(false) => {}
            Err(e) => {
                denied.get_or_insert((place, e));
            }
        }
    }
    denied.map_or(Ok(None), Err)
}

/// Whether `root` holds a tracefs (its `events` directory); Err when that
/// cannot be looked at (permission denied).
fn probe(root: &Path) -> Result<bool, io::Error> {
    // Looking up `events` also triggers the tracefs automount under debugfs.
    match fs::metadata(root.join("events")) {
        Ok(meta) => Ok(meta.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(e),
        Err(_) => Ok(false),
    }
}

fn locate(candidates: &[PathBuf]) -> Result<Option<PathBuf>, FormatError> {
    let mut denied = None;
    for root in candidates {
        match probe(root) {
            Ok(true) => return Ok(Some(root.clone())),
            Ok(false) => {}
            Err(e) => {
                denied.get_or_insert((root.clone(), e));
            }
        }
    }
    match denied {
        Some((root, e)) => Err(FormatError::NoTracefs {
            reason: format!("tracefs at {} is not accessible: {e}", root.display()),
            hint: "run leaktrace as root".into(),
        }),
        None => Ok(None),
    }
}

/// Mounts tracefs at its usual place, falling back to debugfs (whose `tracing` directory
/// automounts tracefs) on kernels or setups without /sys/kernel/tracing.
fn mount_tracefs() -> Result<PathBuf, FormatError> {
    let attempts = [
        ("tracefs", "/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("debugfs", "/sys/kernel/debug", "/sys/kernel/debug/tracing"),
    ];
    let mut failures = Vec::new();
    for (fstype, target, root) in attempts {
        match mount(fstype, Path::new(target)) {
            // EBUSY: someone mounted it meanwhile, which is just as good.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                failures.push(format!("mount -t {fstype} nodev {target}: {e}"));
                continue;
            }
        }
        let root = PathBuf::from(root);
        if root.join("events").is_dir() {
            return Ok(root);
        }
        failures.push(format!(
            "{} has no events/ after mounting {fstype}",
            root.display()
        ));
    }
    Err(FormatError::NoTracefs {
        reason: failures.join("; "),
        hint: MOUNT_HINT.into(),
    })
}

fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let c = |s: &[u8]| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (source, target, fstype) = (
        c(b"nodev")?,
        c(target.as_os_str().as_bytes())?,
        c(fstype.as_bytes())?,
    );
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data may be NULL.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests;
