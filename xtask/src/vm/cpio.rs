//! A newc-format cpio writer for the guest initramfs. Written here rather than
//! shelling out to `cpio` so the archive can hold a /dev/console node (the kernel
//! opens it for init's stdio before anything is mounted) without root-owned
//! files on the host.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context, Result};

pub struct Cpio {
    out: BufWriter<File>,
    ino: u32,
}

impl Cpio {
    pub fn create(path: &Path) -> Result<Cpio> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cpio {
            out: BufWriter::new(file),
            ino: 1,
        })
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() as u32 + 1;
        let fields = [
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut h = String::from("070701");
        for f in fields {
            h += &format!("{f:08x}");
        }
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize as usize)
    }

    fn pad(&mut self, written: usize) -> io::Result<()> {
        let pad = (4 - written % 4) % 4;
        self.out.write_all(&[0; 3][..pad])
    }

    pub fn dir(&mut self, name: &str) -> Result<()> {
        self.header(name, 0o040755, 0, (0, 0))
            .with_context(|| format!("writing cpio entry {name}"))
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> Result<()> {
        self.header(name, 0o020600, 0, (major, minor))
            .with_context(|| format!("writing cpio entry {name}"))
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len()).context("file too large for cpio")?;
        (|| {
            self.header(name, 0o100755, size, (0, 0))?;
            self.out.write_all(data)?;
            self.pad(data.len())
        })()
        .with_context(|| format!("writing cpio entry {name}"))
    }

    pub fn file_from(&mut self, name: &str, src: &Path) -> Result<()> {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.file(name, &data)
    }

    pub fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0, (0, 0))
            .and_then(|()| self.out.flush())
            .context("finishing cpio archive")
    }
}
