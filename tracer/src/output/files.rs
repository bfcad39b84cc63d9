//! Where --pprof, --folded and --flamegraph go: checked before anything is
//! attached (a typo in a directory must not cost an hour of tracing), written
//! exactly once at the end, and never lost: a write that fails then goes to a
//! fallback file under $TMPDIR that is named on stderr.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// One output file asked for on the command line.
#[derive(Debug)]
pub struct Destination {
    /// The flag that named it, for messages.
    pub flag: &'static str,
    /// As given, for messages.
    pub path: PathBuf,
    kind: Kind,
    /// The file the path resolves to: two spellings of one file (`./x` and
    /// `/abs/x`, `d/../x`, a symlink, a hard link) are one file.
    id: FileId,
}

#[derive(Debug)]
enum Kind {
    /// A regular file (or a new one): temp file in the same directory + rename,
    /// so an existing profile stays whole until the new one is complete. The
    /// path is the symlink's target where the given path is a symlink (a
    /// dangling one too), so the link survives.
    Regular(PathBuf),
    /// A FIFO or character device (`/dev/stdout`, `<(…)`): written in place,
    /// once; renaming over it would replace the device node.
    Stream,
}

/// A file as the kernel tells files apart, not as a path spells it.
#[derive(Debug, PartialEq, Eq)]
enum FileId {
    /// An existing file, FIFO or device.
    Existing { dev: u64, ino: u64 },
    /// A name not there yet: its directory, and the name in it.
    New { dev: u64, ino: u64, name: OsString },
}

/// How long a FIFO's reader may keep the end of a run waiting, and what else
/// ends the wait. Without a bound, a FIFO nobody reads blocks the open (and a
/// reader that stops reading, the write) for good: past Ctrl-C and SIGTERM,
/// after everything was detached and before the final report is printed.
pub struct Patience<'a> {
    /// No reader at all, or no byte taken, for this long: give up.
    pub wait: Duration,
    /// The user asked to stop again (a second Ctrl-C or SIGTERM): give up now.
    pub cancelled: &'a dyn Fn() -> bool,
}

/// Long enough to start `cat FIFO` in another terminal once the run ends,
/// short enough that a forgotten FIFO does not look like a hang.
const READER_WAIT: Duration = Duration::from_secs(10);
/// How often a wait looks for a reader and for a request to stop.
const WAIT_STEP: Duration = Duration::from_millis(50);

impl<'a> Patience<'a> {
    /// [`READER_WAIT`], cut short when `cancelled` says so.
    pub fn new(cancelled: &'a dyn Fn() -> bool) -> Patience<'a> {
        Patience {
            wait: READER_WAIT,
            cancelled,
        }
    }
}

impl Destination {
    /// Checks that `path` can be written and says why not, naming the flag.
    pub fn check(flag: &'static str, path: &Path) -> Result<Destination> {
        let shown = || format!("{flag} {}", path.display());
        // A dangling symlink is followed to the file it names, as a live one is.
        let target = follow_dangling_links(path).with_context(shown)?;
        let meta = match std::fs::metadata(&target) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(shown),
        };
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            bail!("{}: is a directory; give a file name", shown());
        }
        if names_a_directory(path) || names_a_directory(&target) {
            // The final rename onto `name/` would fail, after the whole run.
            bail!(
                "{}: ends in '/', so it names a directory; give a file name",
                shown()
            );
        }
        let kind = match &meta {
            Some(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => Kind::Stream,
            Some(_) => Kind::Regular(
                std::fs::canonicalize(&target)
                    .with_context(|| format!("{}: resolving the path", shown()))?,
            ),
            None => Kind::Regular(target.clone()),
        };
        if let Kind::Regular(target) = &kind {
            // The same create the final write makes, undone at once: nothing is
            // left behind if leaktrace is killed, and an unwritable directory
            // (missing, read-only, /proc) is refused now rather than at the end.
            let (tmp, file) = create_temp(target).with_context(|| {
                format!(
                    "{}: cannot create files in {}",
                    shown(),
                    dir_of(target).display()
                )
            })?;
            drop(file);
            let _ = std::fs::remove_file(&tmp);
        }
        let id = match &meta {
            Some(m) => FileId::Existing {
                dev: m.dev(),
                ino: m.ino(),
            },
            None => {
                let dir = dir_of(&target);
                let d = std::fs::metadata(dir)
                    .with_context(|| format!("{}: reading {}", shown(), dir.display()))?;
                FileId::New {
                    dev: d.dev(),
                    ino: d.ino(),
                    name: target.file_name().unwrap_or_default().to_owned(),
                }
            }
        };
        Ok(Destination {
            flag,
            path: path.to_owned(),
            kind,
            id,
        })
    }

    /// Writes `bytes` where asked; on failure, to the fallback file, and
    /// returns the error with the fallback named. A FIFO or device is given
    /// `patience` to take the bytes.
    pub fn write(&self, bytes: &[u8], patience: &Patience<'_>) -> Result<()> {
        let Err(err) = self.write_here(bytes, patience) else {
            return Ok(());
        };
        let fallback = fallback_path(&self.path);
        match std::fs::write(&fallback, bytes) {
            Ok(()) => Err(err.context(format!(
                "{} {}: not written there; saved to {} instead",
                self.flag,
                self.path.display(),
                fallback.display()
            ))),
            Err(e) => Err(err.context(format!(
                "{} {}: not written there, and the fallback {} failed too ({e})",
                self.flag,
                self.path.display(),
                fallback.display()
            ))),
        }
    }

    fn write_here(&self, bytes: &[u8], patience: &Patience<'_>) -> Result<()> {
        match &self.kind {
            Kind::Stream => self.write_stream(bytes, patience),
            Kind::Regular(target) => {
                let (tmp, mut file) = create_temp(target)
                    .with_context(|| format!("creating a file in {}", dir_of(target).display()))?;
                let done = file
                    .write_all(bytes)
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("writing {}", tmp.display()))
                    .and_then(|()| {
                        std::fs::rename(&tmp, target).with_context(|| {
                            format!("renaming {} to {}", tmp.display(), target.display())
                        })
                    });
                if done.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                done
            }
        }
    }

    /// Opened without blocking: a FIFO with no reader fails the open at once
    /// (ENXIO) instead of sleeping in it, so the wait for a reader, and for a
    /// full pipe to drain, is ours to bound and to cut short.
    fn write_stream(&self, bytes: &[u8], patience: &Patience<'_>) -> Result<()> {
        let path = &self.path;
        let wait = patience.wait.as_secs_f64();
        let started = Instant::now();
        let mut said = false;
        let file = loop {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    if !said {
                        eprintln!(
                            "leaktrace: {} {}: no reader has the FIFO open; waiting up to {wait:.0}s \
                             for one (Ctrl-C or SIGTERM gives up; the content then goes to {})",
                            self.flag,
                            path.display(),
                            fallback_path(path).display()
                        );
                        said = true;
                    }
                    if (patience.cancelled)() {
                        bail!(
                            "no reader opened {}; gave up when asked to stop",
                            path.display()
                        );
                    }
                    if started.elapsed() >= patience.wait {
                        bail!("no reader opened {} within {wait:.0}s", path.display());
                    }
                    std::thread::sleep(WAIT_STEP);
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            }
        };
        let mut left = bytes;
        let mut progress = Instant::now();
        while !left.is_empty() {
            match (&file).write(left) {
                Ok(0) => bail!("writing {}: it took no bytes", path.display()),
                Ok(n) => {
                    left = &left[n..];
                    progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if (patience.cancelled)() {
                        bail!(
                            "writing {}: the reader was still {} bytes short when asked to stop",
                            path.display(),
                            left.len()
                        );
                    }
                    if progress.elapsed() >= patience.wait {
                        bail!(
                            "writing {}: the reader took nothing for {wait:.0}s ({} bytes left)",
                            path.display(),
                            left.len()
                        );
                    }
                    wait_writable(&file, WAIT_STEP);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        Ok(())
    }
}

/// Sleeps until `file` can take bytes, or `step` passes.
fn wait_writable(file: &File, step: Duration) {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call. Its result only
    // shortens the sleep: the caller writes again and sees what happened.
    unsafe { libc::poll(&mut fd, 1, step.as_millis() as libc::c_int) };
}

/// The path, or where a dangling symlink (a chain of them) points: the file
/// it names is created, and the link kept. A path that exists is returned
/// as it is; the kernel resolves it at each use.
fn follow_dangling_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut at = path.to_path_buf();
    // The kernel's own limit on symlinks in one lookup (MAXSYMLINKS).
    for _ in 0..40 {
        match std::fs::metadata(&at) {
            Ok(_) => return Ok(at),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&at)?;
                // An absolute target replaces the path; a relative one is
                // relative to the link's directory.
                at = dir_of(&at).join(link);
            }
            _ => return Ok(at),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// `x/`, `x/.`, `..`: the kernel takes these as directories, whatever
/// `Path::file_name` makes of them.
fn names_a_directory(path: &Path) -> bool {
    let b = path.as_os_str().as_bytes();
    b.ends_with(b"/") || b == b"." || b == b".." || b.ends_with(b"/.") || b.ends_with(b"/..")
}

fn dir_of(target: &Path) -> &Path {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A new file next to `target` (same file system, so rename is atomic), named
/// after it and this process so two leaktraces never share one.
fn create_temp(target: &Path) -> std::io::Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir_of(target).join(format!(".{name}.leaktrace-{}.tmp", std::process::id()));
    // A killed run with the same pid may have left one; O_EXCL then makes sure
    // a symlink planted at the name is not followed.
    let _ = std::fs::remove_file(&tmp);
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    Ok((tmp, file))
}

/// `$TMPDIR/leaktrace-<pid>-<file name>`: unique per run, and the file name
/// still says what it is.
pub fn fallback_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    std::env::temp_dir().join(format!("leaktrace-{}-{name}", std::process::id()))
}

/// Refuses two flags naming one file, however each spells it: the second
/// write would silently replace the first.
pub fn check_distinct(dests: &[&Destination]) -> Result<()> {
    for (i, a) in dests.iter().enumerate() {
        for b in &dests[i + 1..] {
            if a.id == b.id {
                let alias = if a.path == b.path {
                    String::new()
                } else {
                    format!(" (as {})", b.path.display())
                };
                bail!(
                    "{} and {} both name {}{alias}; give each its own file",
                    a.flag,
                    b.flag,
                    a.path.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> bool {
        false
    }

    fn patient() -> Patience<'static> {
        Patience::new(&never)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("leaktrace-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_missing_directory_is_refused_up_front_naming_the_flag() {
        let err =
            Destination::check("--pprof", Path::new("/nonexistent/x.pb.gz")).expect_err("refused");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("--pprof /nonexistent/x.pb.gz: cannot create files in /nonexistent"),
            "{msg}"
        );
        let err = Destination::check("--folded", Path::new("/")).expect_err("a directory");
        assert!(format!("{err:#}").contains("is a directory"), "{err:#}");
    }

    #[test]
    fn an_existing_file_is_replaced_whole_and_the_check_leaves_nothing() {
        let dir = scratch("replace");
        let path = dir.join("p.folded");
        std::fs::write(&path, "old").expect("old");
        let dest = Destination::check("--folded", &path).expect("writable");
        let entries = || std::fs::read_dir(&dir).expect("list").count();
        assert_eq!(entries(), 1, "the check left a temp file");
        dest.write(b"new", &patient()).expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(entries(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlink_is_followed_and_kept() {
        let dir = scratch("link");
        let real = dir.join("real.svg");
        std::fs::write(&real, "old").expect("old");
        let link = dir.join("link.svg");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        Destination::check("--flamegraph", &link)
            .expect("writable")
            .write(b"new", &patient())
            .expect("written");
        assert!(std::fs::symlink_metadata(&link).expect("link").is_symlink());
        assert_eq!(std::fs::read(&real).expect("read"), b"new");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_removed_mid_run_sends_the_bytes_to_the_fallback() {
        let dir = scratch("gone");
        let path = dir.join("gone.pb.gz");
        let dest = Destination::check("--pprof", &path).expect("writable");
        std::fs::remove_dir_all(&dir).expect("remove");
        let err = dest
            .write(b"profile", &patient())
            .expect_err("the directory is gone");
        let fallback = fallback_path(&path);
        let msg = format!("{err:#}");
        assert!(msg.contains(&fallback.display().to_string()), "{msg}");
        assert_eq!(std::fs::read(&fallback).expect("fallback"), b"profile");
        let _ = std::fs::remove_file(&fallback);
    }

    #[test]
    fn device_nodes_are_written_in_place() {
        let dest = Destination::check("--folded", Path::new("/dev/null")).expect("writable");
        dest.write(b"x", &patient()).expect("written");
        assert!(std::fs::metadata("/dev/null")
            .expect("still there")
            .file_type()
            .is_char_device());
    }

    #[test]
    fn a_fifo_is_written_once_in_place() {
        let dir = scratch("fifo");
        let fifo = dir.join("pipe");
        mkfifo(&fifo);
        // The check must not open it: with no reader that would block.
        let dest = Destination::check("--folded", &fifo).expect("a FIFO is writable");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).expect("read the FIFO"))
        };
        dest.write(b"a;b 1\n", &patient()).expect("written");
        assert_eq!(reader.join().expect("reader"), b"a;b 1\n");
        assert!(std::fs::metadata(&fifo)
            .expect("still there")
            .file_type()
            .is_fifo());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_flags_on_one_file_are_refused() {
        let a = Destination::check("--pprof", Path::new("/tmp/same")).expect("ok");
        let b = Destination::check("--folded", Path::new("/tmp/same")).expect("ok");
        let err = check_distinct(&[&a, &b]).expect_err("same file");
        assert!(err.to_string().contains("--pprof and --folded"), "{err}");
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    #[test]
    fn a_fifo_nobody_reads_is_given_up_on_and_its_bytes_kept() {
        let dir = scratch("fifo-deaf");
        let fifo = dir.join("deaf");
        mkfifo(&fifo);
        let dest = Destination::check("--pprof", &fifo).expect("a FIFO is writable");
        let started = Instant::now();
        let brief = Patience {
            wait: Duration::from_millis(300),
            cancelled: &never,
        };
        let err = dest.write(b"profile", &brief).expect_err("no reader");
        assert!(started.elapsed() < Duration::from_secs(3), "{err:#}");
        let msg = format!("{err:#}");
        assert!(msg.contains("no reader opened"), "{msg}");
        let fallback = fallback_path(&fifo);
        assert_eq!(std::fs::read(&fallback).expect("fallback"), b"profile");
        let _ = std::fs::remove_file(&fallback);
        // Asked to stop: at once, whatever the wait.
        let started = Instant::now();
        let stop = Patience {
            wait: Duration::from_secs(3600),
            cancelled: &|| true,
        };
        let err = dest.write(b"again", &stop).expect_err("cancelled");
        assert!(started.elapsed() < Duration::from_secs(2), "{err:#}");
        assert!(format!("{err:#}").contains("asked to stop"), "{err:#}");
        let _ = std::fs::remove_file(&fallback);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_file_under_two_spellings_is_refused() {
        let dir = scratch("alias");
        std::fs::create_dir(dir.join("sub")).expect("sub");
        let check = |flag, p: &Path| Destination::check(flag, p).expect("writable");
        let refused = |a: &Destination, b: &Destination| {
            let err = check_distinct(&[a, b]).expect_err("one file");
            assert!(err.to_string().contains("both name"), "{err}");
        };
        // Not there yet: the same name in the same directory.
        let new = check("--pprof", &dir.join("x"));
        refused(&new, &check("--folded", &dir.join("sub/../x")));
        refused(&new, &check("--folded", &dir.join("./x")));
        // There: a symlink and a hard link are the file they name.
        std::fs::write(dir.join("y"), "old").expect("y");
        std::os::unix::fs::symlink(dir.join("y"), dir.join("link")).expect("symlink");
        std::fs::hard_link(dir.join("y"), dir.join("hard")).expect("hard link");
        let y = check("--pprof", &dir.join("y"));
        refused(&y, &check("--folded", &dir.join("link")));
        refused(&y, &check("--flamegraph", &dir.join("hard")));
        // Different files stay allowed.
        check_distinct(&[&new, &y]).expect("two files");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_trailing_slash_on_a_new_name_is_refused_up_front() {
        let dir = scratch("slash");
        let mut p = dir.join("newfile").into_os_string();
        p.push("/");
        let err = Destination::check("--pprof", Path::new(&p)).expect_err("a directory name");
        assert!(format!("{err:#}").contains("names a directory"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dangling_symlink_is_followed_and_kept() {
        let dir = scratch("dangling");
        let link = dir.join("link.pb.gz");
        std::os::unix::fs::symlink("real.pb.gz", &link).expect("symlink");
        Destination::check("--pprof", &link)
            .expect("writable")
            .write(b"new", &patient())
            .expect("written");
        assert!(std::fs::symlink_metadata(&link).expect("link").is_symlink());
        assert_eq!(std::fs::read(dir.join("real.pb.gz")).expect("read"), b"new");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
