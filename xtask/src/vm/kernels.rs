//! Debian kernels for the VM matrix, fetched with a private apt configuration so
//! the host's apt state is never touched, and cached under `target/vm/` so a warm
//! run needs no network.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Suites that carry the kernel series we test: bullseye 5.10, bookworm 6.1,
/// trixie 6.12, trixie-backports 7.x. Security suites carry the newest point
/// releases of the LTS kernels.
const SUITES: &[&str] = &["bullseye", "bookworm", "trixie", "trixie-backports"];
const SECURITY_SUITES: &[&str] = &["bullseye-security", "bookworm-security", "trixie-security"];

/// The cloud flavour is a third of the size of the generic one and has everything
/// the tests need built in (serial console, BTF, tracefs, bpffs).
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A resolved kernel: the Debian ABI name and package version.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: String,
    pub abi: String,
    pub version: String,
    pub vmlinux: PathBuf,
}

pub struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    pub fn new(vm_dir: &Path) -> Apt {
        Apt {
            dir: vm_dir.join("apt"),
            updated: false,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("apt.conf")
    }

    /// Writes the private configuration and downloads the package lists, once per run.
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        let d = &self.dir;
        for sub in [
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/sources.list.d",
            "lists/partial",
            "cache/archives/partial",
            "state",
            "debs",
        ] {
            fs::create_dir_all(d.join(sub))
                .with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        let status = d.join("state/status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("writing {}", status.display()))?;
        }
        let (main, security) = host_mirrors();
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        let signed = if keyring.exists() {
            format!("[signed-by={}] ", keyring.display())
        } else {
            String::new()
        };
        let mut sources = String::new();
        for suite in SUITES {
            sources += &format!("deb {signed}{main} {suite} main\n");
        }
        for suite in SECURITY_SUITES {
            sources += &format!("deb {signed}{security} {suite} main\n");
        }
        fs::write(d.join("etc/sources.list"), sources).context("writing private sources.list")?;
        let p = |s: &str| d.join(s).display().to_string();
        let conf = format!(
            "Dir::State \"{}\";\nDir::State::Lists \"{}\";\nDir::State::status \"{}\";\n\
             Dir::Cache \"{}\";\nDir::Etc::SourceList \"{}\";\nDir::Etc::SourceParts \"{}\";\n\
             Dir::Etc::Parts \"{}\";\nDir::Etc::Preferences \"{}\";\nDir::Etc::PreferencesParts \"{}\";\n\
             APT::Architecture \"amd64\";\nAcquire::Languages \"none\";\n\
             // Old suites (bullseye) carry expired Valid-Until dates on some mirrors.\n\
             Acquire::Check-Valid-Until \"false\";\n\
             // The _apt sandbox user may not be able to enter the workspace.\n\
             APT::Sandbox::User \"root\";\n",
            p("state"),
            p("lists"),
            p("state/status"),
            p("cache"),
            p("etc/sources.list"),
            p("etc/sources.list.d"),
            p("etc/apt.conf.d"),
            p("etc/preferences"),
            p("etc/preferences.d"),
        );
        fs::write(self.config(), conf).context("writing private apt.conf")?;
        eprintln!("vm-test: updating the private apt lists ({main}, {security})");
        run_quiet(self.cmd("apt-get").args(["-q", "update"]))?;
        self.updated = true;
        Ok(())
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.config()).env("LC_ALL", "C");
        c
    }

    /// `apt-cache show PKG`: one stanza per available version.
    fn show(&self, pkg: &str) -> Result<Vec<Stanza>> {
        let out = output(self.cmd("apt-cache").args(["show", pkg]))?;
        Ok(out
            .split("\n\n")
            .filter(|s| !s.trim().is_empty())
            .map(Stanza::parse)
            .collect())
    }

    /// Downloads `pkg=version` into the package cache and returns the .deb path.
    fn download(&mut self, pkg: &str, version: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        let prefix = format!("{pkg}_");
        // apt escapes an epoch's colon in file names (1%3a1.37.0); match after it.
        let bare = version.split_once(':').map_or(version, |(_, v)| v);
        let find = || -> Result<Option<PathBuf>> {
            for e in fs::read_dir(&debs).with_context(|| format!("reading {}", debs.display()))? {
                let path = e?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(&prefix)
                    && name.ends_with(".deb")
                    && name.contains(&format!("{bare}_"))
                {
                    return Ok(Some(path));
                }
            }
            Ok(None)
        };
        if let Some(p) = find()? {
            return Ok(p);
        }
        self.update()?;
        eprintln!("vm-test: downloading {pkg} {version}");
        run_quiet(self.cmd("apt-get").current_dir(&debs).args([
            "-q",
            "download",
            &format!("{pkg}={version}"),
        ]))?;
        find()?.with_context(|| format!("apt-get download {pkg}={version} left no .deb"))
    }
}

struct Stanza {
    fields: Vec<(String, String)>,
}

impl Stanza {
    fn parse(text: &str) -> Stanza {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(last) = fields.last_mut() {
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Stanza { fields }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Names of the packages in `Depends` (alternatives included).
    fn depends(&self) -> Vec<String> {
        self.get("Depends")
            .unwrap_or("")
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}

/// The host's Debian mirror, so the VM test uses whatever mirror (or proxy) this
/// machine is configured for; Debian's canonical CDN otherwise.
fn host_mirrors() -> (String, String) {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut extra: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_string));
            } else if line.starts_with("deb ") {
                // `deb [options] URI suite components`
                let mut words = line.split_whitespace().skip(1).peekable();
                if words.peek().is_some_and(|w| w.starts_with('[')) {
                    for w in words.by_ref() {
                        if w.ends_with(']') {
                            break;
                        }
                    }
                }
                uris.extend(words.next().map(str::to_string));
            }
        }
    }
    let pick = |suffix: &str, default: &str| {
        uris.iter()
            .map(|u| u.trim_end_matches('/'))
            .find(|u| u.ends_with(suffix) && u.starts_with("http"))
            .unwrap_or(default)
            .to_string()
    };
    (
        pick("/debian", "http://deb.debian.org/debian"),
        pick("/debian-security", "http://deb.debian.org/debian-security"),
    )
}

/// Does Debian package version `version` belong to `series` ("5.10", "6.1", "7")?
fn in_series(version: &str, series: &str) -> bool {
    let upstream = version.split(['-', '~', '+']).next().unwrap_or("");
    let mut v = upstream.split('.');
    series.split('.').all(|s| v.next() == Some(s))
}

fn dpkg_newer(a: &str, b: &str) -> Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

/// The kernel for `series`: from the cache when it was resolved before (no
/// network), otherwise the newest version Debian serves, downloaded and unpacked.
pub fn ensure(apt: &mut Apt, vm_dir: &Path, series: &str, refresh: bool) -> Result<Kernel> {
    let kdir = vm_dir.join("kernels");
    fs::create_dir_all(&kdir).with_context(|| format!("creating {}", kdir.display()))?;
    let resolved = kdir.join(format!("{series}.resolved"));
    if !refresh {
        if let Ok(text) = fs::read_to_string(&resolved) {
            if let Some((abi, version)) = text.trim().split_once(' ') {
                let vmlinux = kdir.join(abi).join("vmlinux");
                if vmlinux.exists() {
                    return Ok(Kernel {
                        series: series.to_string(),
                        abi: abi.to_string(),
                        version: version.to_string(),
                        vmlinux,
                    });
                }
            }
        }
    }

    apt.update()?;
    let mut best: Option<(String, String)> = None;
    for meta in apt.show(META_PACKAGE)? {
        let Some(version) = meta.get("Version") else {
            continue;
        };
        if !in_series(version, series) {
            continue;
        }
        let Some(image) = meta
            .depends()
            .into_iter()
            .find(|d| d.starts_with("linux-image-") && d != META_PACKAGE)
        else {
            continue;
        };
        if match &best {
            Some((_, v)) => dpkg_newer(version, v)?,
            None => true,
        } {
            best = Some((image, version.to_string()));
        }
    }
    let Some((image, version)) = best else {
        bail!("Debian serves no {META_PACKAGE} for kernel series {series} in {SUITES:?}");
    };
    let abi = image
        .strip_prefix("linux-image-")
        .unwrap_or(&image)
        .to_string();
    let dir = kdir.join(&abi);
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        // From 7.x the image package is a stub and the kernel is in linux-binary-<abi>.
        let mut debs = vec![apt.download(&image, &version)?];
        let binary = format!("linux-binary-{abi}");
        let image_stanza = apt
            .show(&format!("{image}={version}"))?
            .into_iter()
            .next()
            .with_context(|| format!("apt-cache show {image}={version} is empty"))?;
        if image_stanza.depends().contains(&binary) {
            debs.push(apt.download(&binary, &version)?);
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let vmlinuz = dir.join("vmlinuz");
        extract_vmlinuz(&debs, &vmlinuz)?;
        let bytes = fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
        let elf = decompress_bzimage(&bytes)
            .with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
        let tmp = dir.join("vmlinux.tmp");
        fs::write(&tmp, elf).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &vmlinux).with_context(|| format!("renaming to {}", vmlinux.display()))?;
        let _ = fs::remove_file(&vmlinuz);
    }
    fs::write(&resolved, format!("{abi} {version}\n"))
        .with_context(|| format!("writing {}", resolved.display()))?;
    Ok(Kernel {
        series: series.to_string(),
        abi,
        version,
        vmlinux,
    })
}

/// Copies the kernel image out of whichever of `debs` holds it
/// (`boot/vmlinuz-*` up to 6.x, `usr/lib/modules/*/vmlinuz` from 7.x).
fn extract_vmlinuz(debs: &[PathBuf], dest: &Path) -> Result<()> {
    for deb in debs {
        let image = extract_member(deb, |m| {
            m.starts_with("boot/vmlinuz-")
                || (m.starts_with("usr/lib/modules/") && m.ends_with("/vmlinuz"))
        })?;
        if let Some(image) = image {
            fs::write(dest, image).with_context(|| format!("writing {}", dest.display()))?;
            return Ok(());
        }
    }
    bail!("no vmlinuz in {debs:?}")
}

/// The contents of the first file in `deb` whose path (without `./`) satisfies `want`.
fn extract_member(deb: &Path, want: impl Fn(&str) -> bool) -> Result<Option<Vec<u8>>> {
    let listing = pipe_to_tar(deb, &["-t"])?;
    let member = String::from_utf8_lossy(&listing)
        .lines()
        .find(|m| want(m.trim_start_matches("./")))
        .map(str::to_string);
    member.map(|m| pipe_to_tar(deb, &["-xO", &m])).transpose()
}

/// `dpkg-deb --fsys-tarfile DEB | tar ARGS`, returning tar's stdout.
fn pipe_to_tar(deb: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb")?;
    let tar_in = dpkg.stdout.take().context("dpkg-deb stdout")?;
    let out = Command::new("tar")
        .args(args)
        .stdin(tar_in)
        .output()
        .context("running tar")?;
    let dpkg_status = dpkg.wait().context("waiting for dpkg-deb")?;
    if !out.status.success() || !dpkg_status.success() {
        bail!(
            "unpacking {}: dpkg-deb {dpkg_status}, tar {}: {}",
            deb.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The ELF vmlinux inside a bzImage. Under TCG the PVH entry of the ELF boots in
/// ~2 s against 4-5 s for the self-decompressing bzImage. The x86 boot protocol
/// header says exactly where the compressed payload is, so no magic-byte search
/// is needed.
fn decompress_bzimage(img: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |off: usize| -> Result<u32> {
        img.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .context("bzImage truncated")
    };
    if img.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS boot header)");
    }
    let setup_sects = match img.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = pm_start + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = img
        .get(offset..offset + len)
        .context("bzImage payload outside the file")?;
    let tool: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        // The kernel's legacy lz4 frame (Debian 5.10).
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        _ => bail!(
            "unsupported bzImage compression (magic {:02x?})",
            &payload[..payload.len().min(6)]
        ),
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", tool[0]))?;
    // The payload ends with the uncompressed size, which some decompressors call
    // trailing garbage: the ELF header decides, not the exit code.
    let _ = writer.join();
    if out.stdout.starts_with(b"\x7fELF") {
        Ok(out.stdout)
    } else {
        bail!(
            "{} did not produce an ELF image: {}",
            tool[0],
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// A static busybox for the guest's /init, from Debian like the kernels.
pub fn ensure_busybox(apt: &mut Apt, vm_dir: &Path) -> Result<PathBuf> {
    let dest = vm_dir.join("busybox");
    if dest.exists() {
        return Ok(dest);
    }
    apt.update()?;
    let version = apt
        .show("busybox-static")?
        .iter()
        .filter_map(|s| s.get("Version").map(str::to_string))
        .try_fold(None::<String>, |best, v| -> Result<Option<String>> {
            Ok(match best {
                Some(b) if !dpkg_newer(&v, &b)? => Some(b),
                _ => Some(v),
            })
        })?
        .context("Debian serves no busybox-static")?;
    let deb = apt.download("busybox-static", &version)?;
    // /bin/busybox before the /usr merge, /usr/bin/busybox after it.
    let bin = extract_member(&deb, |m| m == "bin/busybox" || m == "usr/bin/busybox")?
        .with_context(|| format!("no busybox binary in {}", deb.display()))?;
    let tmp = vm_dir.join("busybox.tmp");
    fs::write(&tmp, bin).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_on_whole_components() {
        assert!(in_series("5.10.262-1", "5.10"));
        assert!(in_series("6.1.192-2", "6.1"));
        assert!(!in_series("6.12.117-1", "6.1"));
        assert!(in_series("6.12.117-1", "6.12"));
        assert!(in_series("7.3.4-1~bpo13+1", "7"));
        assert!(!in_series("6.17.8-1~bpo13+1", "7"));
    }

    #[test]
    fn stanza_depends_lists_package_names() {
        let s = Stanza::parse(
            "Package: linux-image-cloud-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: linux-base (= 1),\n linux-image-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), a | b\n",
        );
        assert_eq!(s.get("Version"), Some("7.3.4-1~bpo13+1"));
        assert_eq!(
            s.depends(),
            [
                "linux-base",
                "linux-image-7.3.4+deb13-cloud-amd64",
                "a",
                "b"
            ]
        );
    }
}
