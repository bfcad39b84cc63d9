//! Kernel addresses -> function names from /proc/kallsyms, kept for the whole
//! run in one compact table: the sorted start addresses and every name in a
//! single string. blazesym's kernel resolver keeps a boxed name and an enum
//! per symbol, ~7.5 MB for 6.18's 121,000 symbols; this table is ~4.3 MB
//! (8 B of address and 4 B of offset a symbol, plus the names' bytes), and
//! the always-on sampler (`serve`'s child) keeps it resident for days.

use std::io::BufRead;

/// Text symbols of /proc/kallsyms by start address.
#[derive(Debug, Default)]
pub struct Kallsyms {
    addrs: Vec<u64>,
    /// Where each symbol's name ends in `names` (it starts where the previous ends).
    ends: Vec<u32>,
    names: String,
}

impl Kallsyms {
    /// /proc/kallsyms' text symbols; empty where it cannot be read or
    /// hides the addresses (kptr_restrict shows zeros), so every frame is
    /// then shown as an address rather than a wrong name.
    pub fn read() -> Kallsyms {
        match std::fs::File::open("/proc/kallsyms") {
            Ok(f) => Kallsyms::parse(std::io::BufReader::new(f)),
            Err(_) => Kallsyms::default(),
        }
    }

    /// Lines `ADDR TYPE NAME [MODULE]`; only functions (types t, T, w, W)
    /// at a non-zero address are kept.
    pub fn parse(text: impl BufRead) -> Kallsyms {
        let mut syms: Vec<(u64, u32, u32)> = Vec::new();
        let mut names = String::new();
        for line in text.lines().map_while(Result::ok) {
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr == 0 {
                continue;
            }
            let (Ok(start), Ok(len)) = (u32::try_from(names.len()), u32::try_from(name.len()))
            else {
                break;
            };
            names.push_str(name);
            syms.push((addr, start, len));
        }
        // Module symbols follow the core kernel's, not in address order.
        syms.sort_by_key(|s| s.0);
        let mut table = Kallsyms {
            addrs: Vec::with_capacity(syms.len()),
            ends: Vec::with_capacity(syms.len()),
            names: String::with_capacity(names.len()),
        };
        for (addr, start, len) in syms {
            let name = &names[start as usize..(start + len) as usize];
            table.names.push_str(name);
            table.addrs.push(addr);
            table.ends.push(table.names.len() as u32);
        }
        table
    }

    /// The function `addr` lies in and its offset: the symbol with the
    /// greatest start address at or below `addr`; None below the first.
    pub fn find(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.addrs.partition_point(|&a| a <= addr).checked_sub(1)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let name = self.names.get(start..self.ends[i] as usize)?;
        Some((name, addr - self.addrs[i]))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.addrs.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_function_below_an_address() {
        let text = "\
ffffffff81000000 T _stext
ffffffff81000100 t helper
ffffffff81002000 D some_data
ffffffffc0001000 t mod_fn\t[somemod]
ffffffff81001000 W weak_fn
";
        let k = Kallsyms::parse(text.as_bytes());
        assert_eq!(k.len(), 4);
        assert_eq!(k.find(0xffffffff81000000), Some(("_stext", 0)));
        assert_eq!(k.find(0xffffffff81000105), Some(("helper", 5)));
        // Data symbols are not functions: the frame stays in weak_fn.
        assert_eq!(k.find(0xffffffff81002010), Some(("weak_fn", 0x1010)));
        assert_eq!(k.find(0xffffffffc0001004), Some(("mod_fn", 4)));
        assert_eq!(k.find(0xffffffff80000000), None);
    }

    #[test]
    fn hidden_addresses_name_nothing() {
        let k = Kallsyms::parse("0000000000000000 T _stext\n0000000000000000 t a\n".as_bytes());
        assert!(k.is_empty());
        assert_eq!(k.find(0xffffffff81000000), None);
    }
}
