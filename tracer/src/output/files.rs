//! Where --pprof, --folded and --flamegraph go: checked before anything is
//! attached (a typo in a directory must not cost an hour of tracing), written
//! exactly once at the end, and never lost: a write that fails then goes to a
//! fallback file under $TMPDIR that is named on stderr.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
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
}

#[derive(Debug)]
enum Kind {
    /// A regular file (or a new one): temp file in the same directory + rename,
    /// so an existing profile stays whole until the new one is complete. The
    /// path is the symlink's target where the given path is a symlink, so the
    /// link survives.
    Regular(PathBuf),
    /// A FIFO or character device (`/dev/stdout`, `<(…)`): written in place,
    /// once; renaming over it would replace the device node.
    Stream,
}

impl Destination {
    /// Checks that `path` can be written and says why not, naming the flag.
    pub fn check(flag: &'static str, path: &Path) -> Result<Destination> {
        let kind = match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                bail!(
                    "{flag} {}: is a directory; give a file name",
                    path.display()
                )
            }
            Ok(meta) if meta.file_type().is_fifo() || meta.file_type().is_char_device() => {
                Kind::Stream
            }
            Ok(_) => Kind::Regular(
                std::fs::canonicalize(path)
                    .with_context(|| format!("{flag} {}: resolving the path", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Kind::Regular(path.to_owned()),
            Err(e) => return Err(e).with_context(|| format!("{flag} {}", path.display())),
        };
        let dest = Destination {
            flag,
            path: path.to_owned(),
            kind,
        };
        if let Kind::Regular(target) = &dest.kind {
            // The same create the final write makes, undone at once: nothing is
            // left behind if leaktrace is killed, and an unwritable directory
            // (missing, read-only, /proc) is refused now rather than at the end.
            let (tmp, file) = create_temp(target).with_context(|| {
                format!(
                    "{flag} {}: cannot create files in {}",
                    path.display(),
                    dir_of(target).display()
                )
            })?;
            drop(file);
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(dest)
    }

    /// Writes `bytes` where asked; on failure, to the fallback file, and
    /// returns the error with the fallback named.
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        let Err(err) = self.write_here(bytes) else {
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

    fn write_here(&self, bytes: &[u8]) -> Result<()> {
        match &self.kind {
            Kind::Stream => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .with_context(|| format!("opening {}", self.path.display()))?;
                f.write_all(bytes)
                    .with_context(|| format!("writing {}", self.path.display()))
            }
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

/// Refuses two flags naming one file: the second write would silently
/// replace the first.
pub fn check_distinct(dests: &[&Destination]) -> Result<()> {
    for (i, a) in dests.iter().enumerate() {
        for b in &dests[i + 1..] {
            let same = match (&a.kind, &b.kind) {
                (Kind::Regular(x), Kind::Regular(y)) => x == y,
                _ => a.path == b.path,
            };
            if same {
                bail!(
                    "{} and {} both name {}; give each its own file",
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
        dest.write(b"new").expect("written");
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
            .write(b"new")
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
        let err = dest.write(b"profile").expect_err("the directory is gone");
        let fallback = fallback_path(&path);
        let msg = format!("{err:#}");
        assert!(msg.contains(&fallback.display().to_string()), "{msg}");
        assert_eq!(std::fs::read(&fallback).expect("fallback"), b"profile");
        let _ = std::fs::remove_file(&fallback);
    }

    #[test]
    fn device_nodes_are_written_in_place() {
        let dest = Destination::check("--folded", Path::new("/dev/null")).expect("writable");
        dest.write(b"x").expect("written");
        assert!(std::fs::metadata("/dev/null")
            .expect("still there")
            .file_type()
            .is_char_device());
    }

    #[test]
    fn a_fifo_is_written_once_in_place() {
        let dir = scratch("fifo");
        let fifo = dir.join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // The check must not open it: with no reader that would block.
        let dest = Destination::check("--folded", &fifo).expect("a FIFO is writable");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).expect("read the FIFO"))
        };
        dest.write(b"a;b 1\n").expect("written");
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
}
