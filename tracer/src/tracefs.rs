//! Tracepoint record layouts as the *running* kernel describes them.
//!
//! The eBPF programs read raw tracepoint records, whose layout changes between kernel
//! versions (e.g. `kmem:kmalloc.gfp_flags` is a 4-byte `gfp_t` on 5.10 and an 8-byte
//! `unsigned long` on 6.1+; `kmem_cache_alloc` has a `name` field on 6.18 but not on 6.12).
//! Hard-coding offsets would silently read garbage on another kernel, so userspace reads
//! `events/<system>/<event>/format` from tracefs and hands the offsets to the programs.
//! GFP bits are not ABI either (they have been renumbered before), so their values are taken
//! from the `__print_flags` table in the `print fmt` line instead of compiled-in constants.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One field of a tracepoint record, as the running kernel's `format` file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Field name without array dimensions (`comm` for `char comm[16]`).
    pub name: String,
    /// C type as printed, with array dimensions moved here (`char[16]`, `char[]`, `const void *`).
    /// The `__data_loc` / `__rel_loc` prefix is not part of it; see `data_loc` and `rel_loc`.
    pub c_type: String,
    /// Byte offset inside the record (for `__rel_loc` fields: of the 4-byte descriptor).
    pub offset: u16,
    /// Size in bytes (4 for `__data_loc` / `__rel_loc` descriptors).
    pub size: u16,
    pub signed: bool,
    /// The field is a dynamic-array descriptor: a u32 whose low 16 bits are an offset and high
    /// 16 bits a length. For `__data_loc` the offset counts from the start of the record.
    /// Also set for `__rel_loc`, whose offset counts from the end of the descriptor
    /// (`offset + 4`) instead; check `rel_loc` before dereferencing.
    pub data_loc: bool,
    /// The field was declared `__rel_loc` (5.18+): its offset is relative, see `data_loc`.
    pub rel_loc: bool,
}

/// A parsed `events/<system>/<event>/format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    pub system: String,
    pub name: String,
    /// The tracepoint id (`common_type` of its records).
    pub id: u32,
    /// All fields in file order, `common_*` ones included.
    pub fields: Vec<Field>,
    /// The text after `print fmt: `, verbatim.
    pub print_fmt: String,
}

/// Why a format could not be found, read or understood. Messages name the file, event or
/// field and say what is wrong, because they end up in front of a user on an unknown kernel.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    // The io::Error is in the message rather than `source()` so that anyhow's `{:#}` does not
    // print it twice.
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("tracepoint {event}: format line {line}: {problem}")]
    BadLine {
        event: String,
        line: usize,
        problem: String,
    },
    #[error("tracepoint {event}: format has no `ID:` line (not a tracefs format file?)")]
    MissingId { event: String },
    #[error("tracepoint {event}: format lists no fields (not a tracefs format file?)")]
    NoFields { event: String },
    #[error("tracepoint {event}: format file describes event `{found}` instead")]
    NameMismatch { event: String, found: String },
    #[error("tracepoint {event} has no field `{field}` on this kernel (it has: {available})")]
    MissingField {
        event: String,
        field: String,
        available: String,
    },
    #[error(
        "tracepoint {event}: field `{field}` is {actual} bytes on this kernel, expected {expected}"
    )]
    FieldSize {
        event: String,
        field: String,
        expected: u16,
        actual: u16,
    },
    #[error("invalid tracepoint name `{system}/{name}`: system and event must be plain names")]
    InvalidName { system: String, name: String },
    #[error("no usable tracefs: {reason}; {hint}")]
    NoTracefs { reason: String, hint: String },
}

impl EventFormat {
    /// Parses the text of a `format` file. `system`/`name` are used in error messages and
    /// checked against the file's own `name:` line when it has one.
    pub fn parse(system: &str, name: &str, text: &str) -> Result<EventFormat, FormatError> {
        let event = format!("{system}/{name}");
        let mut id = None;
        let mut fields = Vec::new();
        let mut print_fmt = String::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let bad = |problem: String| FormatError::BadLine {
                event: event.clone(),
                line: index + 1,
                problem,
            };
            if let Some(found) = line.strip_prefix("name:") {
                let found = found.trim();
                if found != name {
                    return Err(FormatError::NameMismatch {
                        event,
                        found: found.to_string(),
                    });
                }
            } else if let Some(value) = line.strip_prefix("ID:") {
                let value = value.trim();
                id = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| bad(format!("ID `{value}` is not a number")))?,
                );
            } else if let Some(rest) = strip_field_prefix(line) {
                fields.push(parse_field(rest).map_err(bad)?);
            } else if let Some(fmt) = line.strip_prefix("print fmt:") {
                print_fmt = fmt.trim().to_string();
            }
            // `format:`, blank lines and anything a future kernel adds carry nothing we need.
        }
        let Some(id) = id else {
            return Err(FormatError::MissingId { event });
        };
        if fields.is_empty() {
            return Err(FormatError::NoFields { event });
        }
        Ok(EventFormat {
            system: system.to_string(),
            name: name.to_string(),
            id,
            fields,
            print_fmt,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of a required field, checking its size (e.g. 8 for a pointer); error names the
    /// event and field.
    pub fn offset_of(&self, name: &str, size: u16) -> Result<u16, FormatError> {
        let field = self.field(name).ok_or_else(|| FormatError::MissingField {
            event: self.event_name(),
            field: name.to_string(),
            available: self.field_names(),
        })?;
        if field.size != size {
            return Err(FormatError::FieldSize {
                event: self.event_name(),
                field: name.to_string(),
                expected: size,
                actual: field.size,
            });
        }
        Ok(field.offset)
    }

    /// Values of the symbolic flags printed by
    /// `__print_flags(REC->gfp_flags, "|", {EXPR, "NAME"}, ...)` in print fmt,
    /// e.g. `print_flag("__GFP_ACCOUNT") == Some(1 << 22)`.
    ///
    /// `None` when the name is not in any table, when its expression cannot be evaluated, or
    /// when two tables give it different values: a guess would be worse than no answer.
    /// Note that some kernels print a bit under an alias only (5.10–6.12 list bit 0 as
    /// `GFP_DMA`, never as `__GFP_DMA`).
    pub fn print_flag(&self, name: &str) -> Option<u64> {
        let mut found = None;
        for (flag, value) in self.print_flags() {
            if flag != name {
                continue;
            }
            match found {
                None => found = Some(value),
                Some(previous) if previous != value => return None,
                Some(_) => {}
            }
        }
        found
    }

    /// Every `(NAME, value)` entry of every `__print_flags` table in print fmt whose value
    /// could be evaluated, in order of appearance.
    pub fn print_flags(&self) -> Vec<(String, u64)> {
        print_flag_calls(&self.print_fmt)
            .into_iter()
            .flat_map(|args| split_top_level(args).unwrap_or_default())
            .filter_map(flag_entry)
            .collect()
    }

    fn event_name(&self) -> String {
        format!("{}/{}", self.system, self.name)
    }

    fn field_names(&self) -> String {
        let names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        names.join(", ")
    }
}

/// Very old kernels marked some fields `field special:`; the layout after it is the same.
fn strip_field_prefix(line: &str) -> Option<&str> {
    line.strip_prefix("field:")
        .or_else(|| line.strip_prefix("field special:"))
}

/// Parses what follows `field:`, e.g. `unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;`.
fn parse_field(rest: &str) -> Result<Field, String> {
    let mut parts = rest.split(';');
    let decl = parts.next().unwrap_or_default().trim();
    let (mut offset, mut size, mut signed) = (None, None, false);
    for attr in parts.map(str::trim).filter(|a| !a.is_empty()) {
        let Some((key, value)) = attr.split_once(':') else {
            return Err(format!("field `{decl}`: attribute `{attr}` has no `:`"));
        };
        let value = value.trim();
        match key.trim() {
            "offset" => offset = Some(parse_u16(decl, "offset", value)?),
            "size" => size = Some(parse_u16(decl, "size", value)?),
            "signed" => signed = parse_signed(decl, value)?,
            _ => {} // unknown attributes would come from a newer kernel; the layout is all we need
        }
    }
    let offset = offset.ok_or_else(|| format!("field `{decl}` has no `offset:`"))?;
    let size = size.ok_or_else(|| format!("field `{decl}` has no `size:`"))?;
    let decl = parse_decl(decl)?;
    Ok(Field {
        name: decl.name,
        c_type: decl.c_type,
        offset,
        size,
        signed,
        data_loc: decl.data_loc || decl.rel_loc,
        rel_loc: decl.rel_loc,
    })
}

fn parse_u16(decl: &str, key: &str, value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .map_err(|_| format!("field `{decl}`: {key} `{value}` is not a number in 0..=65535"))
}

fn parse_signed(decl: &str, value: &str) -> Result<bool, String> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("field `{decl}`: signed `{value}` is not 0 or 1")),
    }
}

struct Decl {
    name: String,
    c_type: String,
    data_loc: bool,
    rel_loc: bool,
}

/// Splits a C declaration like `char comm[16]` or `__data_loc char[] name` into name and type.
fn parse_decl(decl: &str) -> Result<Decl, String> {
    let (data_loc, rel_loc, rest) = if let Some(rest) = decl.strip_prefix("__data_loc ") {
        (true, false, rest)
    } else if let Some(rest) = decl.strip_prefix("__rel_loc ") {
        (false, true, rest)
    } else {
        (false, false, decl)
    };
    let (base, dims) = split_array_dims(rest.trim_end());
    let name_start = base
        .char_indices()
        .rev()
        .find(|(_, c)| !is_ident_char(*c))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let name = &base[name_start..];
    let c_type = base[..name_start].trim();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("field declaration `{decl}` does not end in a name"));
    }
    if c_type.is_empty() {
        return Err(format!("field declaration `{decl}` has no type"));
    }
    Ok(Decl {
        name: name.to_string(),
        c_type: format!("{c_type}{dims}"),
        data_loc,
        rel_loc,
    })
}

/// `("char comm", "[16]")` for `char comm[16]`; multi-dimensional arrays keep all dimensions.
fn split_array_dims(decl: &str) -> (&str, &str) {
    let mut base = decl;
    while base.ends_with(']') {
        match base.rfind('[') {
            Some(open) => base = base[..open].trim_end(),
            None => break,
        }
    }
    (base, &decl[base.len()..])
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The argument text (between the parentheses) of each `__print_flags(...)` call.
fn print_flag_calls(fmt: &str) -> Vec<&str> {
    let bytes = fmt.as_bytes();
    let mut calls = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' || b == b'\'' {
            match skip_quoted(bytes, i) {
                Some(end) => i = end,
                None => break,
            }
        } else if is_ident_char(b as char) {
            let start = i;
            while i < bytes.len() && is_ident_char(bytes[i] as char) {
                i += 1;
            }
            let ident = &fmt[start..i];
            if ident == "__print_flags" || ident == "__print_flags_u64" {
                let open = skip_spaces(bytes, i);
                if bytes.get(open) == Some(&b'(') {
                    if let Some(close) = matching_close(bytes, open) {
                        calls.push(&fmt[open + 1..close]);
                        i = close + 1;
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    calls
}

fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Index just past the closing quote of the literal opening at `open`; `None` if unterminated.
fn skip_quoted(bytes: &[u8], open: usize) -> Option<usize> {
    let quote = *bytes.get(open)?;
    let mut i = open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b if b == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Index of the bracket closing the one at `open`, skipping string literals and nested
/// brackets of any kind; `None` if the text is unbalanced.
fn matching_close(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' => {
                i = skip_quoted(bytes, i)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Splits on commas that are outside brackets and string literals; `None` if unbalanced.
fn split_top_level(text: &str) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' => {
                i = skip_quoted(bytes, i)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// `{EXPR, "NAME"}` -> `(NAME, value)`. The first two `__print_flags` arguments (the field
/// and the delimiter) and the `{ 0, NULL }` terminator newer kernels emit are not of this
/// shape and fall out here.
fn flag_entry(arg: &str) -> Option<(String, u64)> {
    let inner = arg.trim().strip_prefix('{')?.strip_suffix('}')?;
    let parts = split_top_level(inner)?;
    let [expr, name] = parts.as_slice() else {
        return None;
    };
    let name = string_literal(name.trim())?;
    let value = cexpr::eval(expr)?;
    Some((name, value))
}

/// The contents of a plain `"..."` literal; flag names never need escapes, so any backslash
/// means this is not a flag name.
fn string_literal(text: &str) -> Option<String> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains(['"', '\\']) {
        return None;
    }
    Some(inner.to_string())
}

/// A tiny evaluator for the integer constant expressions the kernel's preprocessor leaves in
/// print fmt tables: literals, casts, `~ - +`, `* + - << >> & ^ |` and parentheses. It follows
/// C's typing rules for an LP64 kernel (int is 32 bits, long 64) because `~` and shifts give
/// different answers at different widths; whatever it does not understand yields `None`.
mod cexpr {
    /// Far deeper than real tables nest (a few dozen levels of parentheses and casts), shallow
    /// enough that a garbled format cannot overflow the stack.
    const MAX_DEPTH: usize = 256;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Ty {
        bits: u32,
        signed: bool,
    }

    const INT: Ty = Ty::new(32, true);
    const UINT: Ty = Ty::new(32, false);
    const LONG: Ty = Ty::new(64, true);
    const ULONG: Ty = Ty::new(64, false);

    impl Ty {
        const fn new(bits: u32, signed: bool) -> Ty {
            Ty { bits, signed }
        }
    }

    /// A value of type `ty`, stored as its two's-complement bits zero-extended to 64.
    #[derive(Clone, Copy, Debug)]
    struct Val {
        raw: u64,
        ty: Ty,
    }

    impl Val {
        fn new(raw: u64, ty: Ty) -> Val {
            let mask = if ty.bits >= 64 {
                u64::MAX
            } else {
                (1u64 << ty.bits) - 1
            };
            Val {
                raw: raw & mask,
                ty,
            }
        }

        /// C conversion: sign-extend from a narrower signed type, then truncate.
        fn convert(self, ty: Ty) -> Val {
            let negative =
                self.ty.signed && self.ty.bits < 64 && (self.raw >> (self.ty.bits - 1)) & 1 == 1;
            let extended = if negative {
                self.raw | (u64::MAX << self.ty.bits)
            } else {
                self.raw
            };
            Val::new(extended, ty)
        }

        fn as_i64(self) -> i64 {
            self.convert(LONG).raw as i64
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        Mul,
        Add,
        Sub,
        Shl,
        Shr,
        And,
        Xor,
        Or,
        Not,
    }

    #[derive(Clone, Copy, Debug)]
    enum Tok<'a> {
        Num(Val),
        Ident(&'a str),
        Open,
        Close,
        Op(Op),
    }

    /// Value of `expr` converted to `unsigned long`, as the kernel's flag tables store it.
    pub(super) fn eval(expr: &str) -> Option<u64> {
        let tokens = tokenize(expr)?;
        let mut parser = Parser { tokens, pos: 0 };
        let value = parser.binary(0, 0)?;
        if parser.pos != parser.tokens.len() {
            return None;
        }
        Some(value.convert(ULONG).raw)
    }

    fn tokenize(expr: &str) -> Option<Vec<Tok<'_>>> {
        let bytes = expr.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let word_end = |from: usize| {
                (from..bytes.len())
                    .find(|&j| !super::is_ident_char(bytes[j] as char))
                    .unwrap_or(bytes.len())
            };
            let (tok, next) = match b {
                _ if b.is_ascii_whitespace() => {
                    i += 1;
                    continue;
                }
                b'0'..=b'9' => {
                    let end = word_end(i);
                    (Tok::Num(literal(&expr[i..end])?), end)
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                    let end = word_end(i);
                    (Tok::Ident(&expr[i..end]), end)
                }
                b'(' => (Tok::Open, i + 1),
                b')' => (Tok::Close, i + 1),
                b'~' => (Tok::Op(Op::Not), i + 1),
                b'*' => (Tok::Op(Op::Mul), i + 1),
                b'+' => (Tok::Op(Op::Add), i + 1),
                b'-' => (Tok::Op(Op::Sub), i + 1),
                b'&' => (Tok::Op(Op::And), i + 1),
                b'^' => (Tok::Op(Op::Xor), i + 1),
                b'|' => (Tok::Op(Op::Or), i + 1),
                b'<' if bytes.get(i + 1) == Some(&b'<') => (Tok::Op(Op::Shl), i + 2),
                b'>' if bytes.get(i + 1) == Some(&b'>') => (Tok::Op(Op::Shr), i + 2),
                _ => return None,
            };
            tokens.push(tok);
            i = next;
        }
        Some(tokens)
    }

    /// An integer literal with C's typing: the first of the allowed types that holds it.
    fn literal(text: &str) -> Option<Val> {
        let body_len = text.find(['u', 'U', 'l', 'L']).unwrap_or(text.len());
        let (body, suffix) = text.split_at(body_len);
        let (unsigned, long) = literal_suffix(suffix)?;
        let (digits, radix) =
            if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
                (hex, 16)
            } else if body.len() > 1 && body.starts_with('0') {
                (&body[1..], 8)
            } else {
                (body, 10)
            };
        if digits.is_empty() || digits.starts_with(['+', '-']) {
            return None;
        }
        let value = u64::from_str_radix(digits, radix).ok()?;
        let candidates: &[Ty] = match (radix == 10, unsigned) {
            (true, false) => &[INT, LONG],
            (_, true) => &[UINT, ULONG],
            (false, false) => &[INT, UINT, LONG, ULONG],
        };
        let ty = candidates
            .iter()
            .filter(|ty| !long || ty.bits == 64)
            .find(|ty| fits(value, **ty))?;
        Some(Val::new(value, *ty))
    }

    /// (unsigned, long) for a literal suffix such as `UL`, `ull`, `LU`; `None` if malformed.
    fn literal_suffix(suffix: &str) -> Option<(bool, bool)> {
        match suffix.to_ascii_lowercase().as_str() {
            "" => Some((false, false)),
            "u" => Some((true, false)),
            "l" | "ll" => Some((false, true)),
            "ul" | "lu" | "ull" | "llu" => Some((true, true)),
            _ => None,
        }
    }

    fn fits(value: u64, ty: Ty) -> bool {
        let max_bits = if ty.signed { ty.bits - 1 } else { ty.bits };
        max_bits >= 64 || value < (1u64 << max_bits)
    }

    /// Cast targets, written the way print fmt spells them. `gfp_t` is `unsigned int` on every
    /// kernel; `long` is 64-bit because tracefs formats are read from the running LP64 kernel.
    fn cast_type(words: &[&str]) -> Option<Ty> {
        let words: Vec<&str> = words
            .iter()
            .copied()
            .filter(|w| !matches!(*w, "__force" | "const" | "volatile" | "__bitwise"))
            .collect();
        Some(match words.join(" ").as_str() {
            "gfp_t" | "unsigned" | "unsigned int" | "u32" | "__u32" | "uint32_t" => UINT,
            "int" | "signed" | "signed int" | "s32" | "__s32" | "int32_t" => INT,
            "unsigned long"
            | "unsigned long int"
            | "long unsigned int"
            | "unsigned long long"
            | "unsigned long long int"
            | "long long unsigned int"
            | "u64"
            | "__u64"
            | "uint64_t"
            | "size_t" => ULONG,
            "long" | "long int" | "signed long" | "long long" | "long long int"
            | "signed long long" | "s64" | "__s64" | "int64_t" | "ssize_t" => LONG,
            _ => return None,
        })
    }

    /// Usual arithmetic conversions for types no narrower than int: the wider type wins, and
    /// at equal width unsigned wins.
    fn common(a: Ty, b: Ty) -> Ty {
        match a.bits.cmp(&b.bits) {
            std::cmp::Ordering::Greater => a,
            std::cmp::Ordering::Less => b,
            std::cmp::Ordering::Equal => Ty {
                bits: a.bits,
                signed: a.signed && b.signed,
            },
        }
    }

    fn precedence(op: Op) -> Option<usize> {
        Some(match op {
            Op::Mul => 6,
            Op::Add | Op::Sub => 5,
            Op::Shl | Op::Shr => 4,
            Op::And => 3,
            Op::Xor => 2,
            Op::Or => 1,
            Op::Not => return None,
        })
    }

    fn apply(op: Op, lhs: Val, rhs: Val) -> Option<Val> {
        if matches!(op, Op::Shl | Op::Shr) {
            return shift(op, lhs, rhs);
        }
        let ty = common(lhs.ty, rhs.ty);
        let (a, b) = (lhs.convert(ty).raw, rhs.convert(ty).raw);
        let raw = match op {
            Op::Mul => a.wrapping_mul(b),
            Op::Add => a.wrapping_add(b),
            Op::Sub => a.wrapping_sub(b),
            Op::And => a & b,
            Op::Xor => a ^ b,
            Op::Or => a | b,
            Op::Shl | Op::Shr | Op::Not => return None,
        };
        Some(Val::new(raw, ty))
    }

    /// Shifts keep the left operand's type; counts that are negative or not below its width
    /// are undefined in C, so they give no value rather than some value.
    fn shift(op: Op, lhs: Val, rhs: Val) -> Option<Val> {
        let count = u32::try_from(rhs.as_i64())
            .ok()
            .filter(|c| *c < lhs.ty.bits)?;
        let raw = match op {
            Op::Shl => lhs.raw << count,
            _ if lhs.ty.signed => (lhs.as_i64() >> count) as u64,
            _ => lhs.raw >> count,
        };
        Some(Val::new(raw, lhs.ty))
    }

    struct Parser<'a> {
        tokens: Vec<Tok<'a>>,
        pos: usize,
    }

    impl<'a> Parser<'a> {
        fn peek(&self) -> Option<Tok<'a>> {
            self.tokens.get(self.pos).copied()
        }

        /// Precedence climbing over the left-associative binary operators.
        fn binary(&mut self, min_prec: usize, depth: usize) -> Option<Val> {
            let mut lhs = self.unary(depth + 1)?;
            while let Some(Tok::Op(op)) = self.peek() {
                let Some(prec) = precedence(op).filter(|p| *p >= min_prec) else {
                    break;
                };
                self.pos += 1;
                let rhs = self.binary(prec + 1, depth + 1)?;
                lhs = apply(op, lhs, rhs)?;
            }
            Some(lhs)
        }

        fn unary(&mut self, depth: usize) -> Option<Val> {
            if depth > MAX_DEPTH {
                return None;
            }
            let tok = self.peek()?;
            self.pos += 1;
            match tok {
                Tok::Num(value) => Some(value),
                Tok::Op(Op::Not) => {
                    let v = self.unary(depth + 1)?;
                    Some(Val::new(!v.raw, v.ty))
                }
                Tok::Op(Op::Sub) => {
                    let v = self.unary(depth + 1)?;
                    Some(Val::new(v.raw.wrapping_neg(), v.ty))
                }
                Tok::Op(Op::Add) => self.unary(depth + 1),
                Tok::Open => match self.cast_words() {
                    Some(words) => {
                        let ty = cast_type(&words)?;
                        Some(self.unary(depth + 1)?.convert(ty))
                    }
                    None => {
                        let v = self.binary(0, depth + 1)?;
                        if !matches!(self.peek(), Some(Tok::Close)) {
                            return None;
                        }
                        self.pos += 1;
                        Some(v)
                    }
                },
                Tok::Ident(_) | Tok::Close | Tok::Op(_) => None,
            }
        }

        /// After an opening parenthesis: if only identifiers follow up to the closing one, this
        /// is a cast; consume it and return the words. Otherwise leave the position alone.
        fn cast_words(&mut self) -> Option<Vec<&'a str>> {
            let mut words = Vec::new();
            let mut i = self.pos;
            while let Some(Tok::Ident(word)) = self.tokens.get(i) {
                words.push(*word);
                i += 1;
            }
            if words.is_empty() || !matches!(self.tokens.get(i), Some(Tok::Close)) {
                return None;
            }
            self.pos = i + 1;
            Some(words)
        }
    }
}

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
fn locate(candidates: &[PathBuf]) -> Result<Option<PathBuf>, FormatError> {
    let mut denied = None;
    for root in candidates {
        // Looking up `events` also triggers the tracefs automount under debugfs.
        match fs::metadata(root.join("events")) {
            Ok(meta) if meta.is_dir() => return Ok(Some(root.clone())),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied.get_or_insert((root.clone(), e));
            }
            _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/formats");
    const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "6.18"];

    fn fixture_text(kernel: &str, system: &str, event: &str) -> String {
        let path = format!("{FIXTURES}/{kernel}/events/{system}/{event}/format");
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    fn fixture(kernel: &str, system: &str, event: &str) -> EventFormat {
        EventFormat::parse(system, event, &fixture_text(kernel, system, event))
            .unwrap_or_else(|e| panic!("{kernel}: {e}"))
    }

    /// Every fixture file as (kernel, system, event, text).
    fn all_fixtures() -> Vec<(String, String, String, String)> {
        let mut out = Vec::new();
        for kernel in KERNELS {
            let kdir = Path::new(FIXTURES).join(kernel).join("events");
            for system in fs::read_dir(&kdir).unwrap() {
                let system = system.unwrap();
                for event in fs::read_dir(system.path()).unwrap() {
                    let event = event.unwrap();
                    let text = fs::read_to_string(event.path().join("format")).unwrap();
                    out.push((
                        kernel.to_string(),
                        system.file_name().to_string_lossy().into_owned(),
                        event.file_name().to_string_lossy().into_owned(),
                        text,
                    ));
                }
            }
        }
        assert!(
            out.len() >= 4 * 7,
            "expected at least 7 fixtures per kernel"
        );
        out
    }

    /// (field, offset, size) expectations; `None` offset means the field must be absent.
    type Layout = &'static [(&'static str, Option<u16>, u16)];

    struct Expected {
        kernel: &'static str,
        kmalloc: Layout,
        kfree: Layout,
        kmem_cache_alloc: Layout,
        kmem_cache_free: Layout,
        /// `__GFP_ACCOUNT`, `__GFP_RECLAIMABLE`, `__GFP_DMA` as print fmt names them.
        gfp_account: Option<u64>,
        gfp_reclaimable: Option<u64>,
        gfp_dma: Option<u64>,
        /// Whether the `__data_loc` path/name descriptors are printed as signed (old kernels do).
        data_loc_signed: bool,
    }

    // GFP values per kernel source: 5.10 include/linux/gfp.h and 6.1 include/linux/gfp_types.h
    // define ___GFP_DMA 0x01u, ___GFP_RECLAIMABLE 0x10u, ___GFP_ACCOUNT 0x400000u; 6.12 and
    // 6.18 gfp_types.h derive them from an enum of bit numbers (DMA 0, RECLAIMABLE 4,
    // ACCOUNT 22), i.e. the same values. Up to 6.12 mmflags.h prints bit 0 only as
    // `GFP_DMA`; 6.18 lists `__GFP_DMA` (and every other ___GFP_*_BIT) as well.
    const EXPECTED: [Expected; 4] = [
        Expected {
            kernel: "5.10",
            kmalloc: &[
                ("ptr", Some(16), 8),
                ("bytes_req", Some(24), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 4),
                ("node", None, 0),
            ],
            kfree: &[("ptr", Some(16), 8)],
            kmem_cache_alloc: &[
                ("ptr", Some(16), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 4),
                ("name", None, 0),
                ("accounted", None, 0),
            ],
            kmem_cache_free: &[("ptr", Some(16), 8), ("name", None, 0)],
            gfp_account: Some(0x40_0000),
            gfp_reclaimable: Some(0x10),
            gfp_dma: None,
            data_loc_signed: true,
        },
        Expected {
            kernel: "6.1",
            kmalloc: &[
                ("ptr", Some(16), 8),
                ("bytes_req", Some(24), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 8),
                ("node", Some(48), 4),
            ],
            kfree: &[("ptr", Some(16), 8)],
            kmem_cache_alloc: &[
                ("ptr", Some(16), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 8),
                ("name", None, 0),
                ("accounted", Some(52), 1),
            ],
            kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
            gfp_account: Some(0x40_0000),
            gfp_reclaimable: Some(0x10),
            gfp_dma: None,
            data_loc_signed: true,
        },
        Expected {
            kernel: "6.12",
            kmalloc: &[
                ("ptr", Some(16), 8),
                ("bytes_req", Some(24), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 8),
                ("node", Some(48), 4),
            ],
            kfree: &[("ptr", Some(16), 8)],
            kmem_cache_alloc: &[
                ("ptr", Some(16), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 8),
                ("name", None, 0),
                ("accounted", Some(52), 1),
            ],
            kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
            gfp_account: Some(1 << 22),
            gfp_reclaimable: Some(1 << 4),
            gfp_dma: None,
            data_loc_signed: false,
        },
        Expected {
            kernel: "6.18",
            kmalloc: &[
                ("ptr", Some(16), 8),
                ("bytes_req", Some(24), 8),
                ("bytes_alloc", Some(32), 8),
                ("gfp_flags", Some(40), 8),
                ("node", Some(48), 4),
            ],
            kfree: &[("ptr", Some(16), 8)],
            kmem_cache_alloc: &[
                ("ptr", Some(16), 8),
                ("name", Some(24), 4),
                ("bytes_alloc", Some(40), 8),
                ("gfp_flags", Some(48), 8),
                ("accounted", Some(60), 1),
            ],
            kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
            gfp_account: Some(1 << 22),
            gfp_reclaimable: Some(1 << 4),
            gfp_dma: Some(1),
            data_loc_signed: false,
        },
    ];

    fn check_layout(kernel: &str, format: &EventFormat, layout: Layout) {
        for &(name, offset, size) in layout {
            let what = format!("{kernel} {}/{} {name}", format.system, format.name);
            match offset {
                Some(offset) => {
                    assert_eq!(format.offset_of(name, size).ok(), Some(offset), "{what}")
                }
                None => assert!(format.field(name).is_none(), "{what} should be absent"),
            }
        }
    }

    #[test]
    fn kmem_layouts_per_kernel() {
        for e in &EXPECTED {
            check_layout(e.kernel, &fixture(e.kernel, "kmem", "kmalloc"), e.kmalloc);
            check_layout(e.kernel, &fixture(e.kernel, "kmem", "kfree"), e.kfree);
            check_layout(
                e.kernel,
                &fixture(e.kernel, "kmem", "kmem_cache_alloc"),
                e.kmem_cache_alloc,
            );
            check_layout(
                e.kernel,
                &fixture(e.kernel, "kmem", "kmem_cache_free"),
                e.kmem_cache_free,
            );
        }
    }

    #[test]
    fn data_loc_fields_are_marked() {
        for e in EXPECTED.iter().filter(|e| e.kernel != "5.10") {
            let free = fixture(e.kernel, "kmem", "kmem_cache_free");
            let name = free.field("name").unwrap();
            assert!(name.data_loc && !name.rel_loc, "{}", e.kernel);
            assert_eq!(name.c_type, "char[]");
            assert_eq!(name.signed, e.data_loc_signed, "{}", e.kernel);
        }
    }

    #[test]
    fn node_variants_exist_only_on_5_10() {
        let node = fixture("5.10", "kmem", "kmalloc_node");
        assert_eq!(node.offset_of("gfp_flags", 4).unwrap(), 40);
        assert_eq!(node.offset_of("node", 4).unwrap(), 44);
        let cache_node = fixture("5.10", "kmem", "kmem_cache_alloc_node");
        assert_eq!(cache_node.offset_of("node", 4).unwrap(), 44);
        for kernel in ["6.1", "6.12", "6.18"] {
            let dir = Path::new(FIXTURES).join(kernel).join("events/kmem");
            assert!(!dir.join("kmalloc_node").exists(), "{kernel}");
            assert!(!dir.join("kmem_cache_alloc_node").exists(), "{kernel}");
        }
    }

    #[test]
    fn gfp_flags_per_kernel() {
        for e in &EXPECTED {
            for event in ["kmalloc", "kmem_cache_alloc"] {
                let f = fixture(e.kernel, "kmem", event);
                let what = format!("{} {event}", e.kernel);
                assert_eq!(f.print_flag("__GFP_ACCOUNT"), e.gfp_account, "{what}");
                assert_eq!(
                    f.print_flag("__GFP_RECLAIMABLE"),
                    e.gfp_reclaimable,
                    "{what}"
                );
                assert_eq!(f.print_flag("__GFP_DMA"), e.gfp_dma, "{what}");
                // Bit 0 is always printed under the GFP_DMA alias.
                assert_eq!(f.print_flag("GFP_DMA"), Some(1), "{what}");
                // __GFP_RECLAIM | __GFP_IO | __GFP_FS = 0x400 | 0x800 | 0x40 | 0x80.
                assert_eq!(f.print_flag("GFP_KERNEL"), Some(0xcc0), "{what}");
                assert_eq!(
                    f.print_flag("GFP_KERNEL_ACCOUNT"),
                    Some(0x40_0cc0),
                    "{what}"
                );
                assert_eq!(f.print_flag("NO_SUCH_FLAG"), None, "{what}");
            }
        }
    }

    #[test]
    fn every_flag_table_entry_evaluates() {
        // The only entry without a value is the `{ 0, ((void *)0) }` terminator, which has no
        // name either; so every named entry of every table must come out.
        for (kernel, system, event, text) in all_fixtures() {
            let f = EventFormat::parse(&system, &event, &text).unwrap();
            let names = f.print_fmt.matches("}, {").count() + 1;
            let flags = f.print_flags();
            if f.print_fmt.contains("__print_flags") {
                let expected = if f.print_fmt.contains("((void *)0) }") {
                    names - 1
                } else {
                    names
                };
                assert_eq!(flags.len(), expected, "{kernel} {system}/{event}");
            } else {
                assert!(flags.is_empty());
            }
        }
    }

    #[test]
    fn transhuge_light_masks_out_reclaim() {
        // GFP_TRANSHUGE_LIGHT = (HIGHUSER_MOVABLE | COMP | NOMEMALLOC | NOWARN) & ~RECLAIM;
        // it exercises `~` on a 32-bit gfp_t inside a 64-bit result.
        // 5.10/6.1: HIGHUSER_MOVABLE = 0x400|0x800|0x40|0x80|0x100000|0x02|0x08 = 0x100cca,
        // COMP 0x40000, NOMEMALLOC 0x80000, NOWARN 0x2000.
        let old = (0x10_0cca | 0x4_0000 | 0x8_0000 | 0x2000) & !0xc00u64;
        for kernel in ["5.10", "6.1", "6.12", "6.18"] {
            let f = fixture(kernel, "kmem", "kmalloc");
            // 6.12+ add __GFP_SKIP_KASAN to HIGHUSER_MOVABLE, which is 0 without KASAN_HW_TAGS.
            assert_eq!(f.print_flag("GFP_TRANSHUGE_LIGHT"), Some(old), "{kernel}");
            assert_eq!(f.print_flag("GFP_TRANSHUGE"), Some(old | 0x400), "{kernel}");
        }
    }

    #[test]
    fn cgroup_events_per_kernel() {
        for kernel in KERNELS {
            for event in ["cgroup_mkdir", "cgroup_rmdir", "cgroup_release"] {
                let f = fixture(kernel, "cgroup", event);
                let what = format!("{kernel} {event}");
                assert_eq!(f.offset_of("root", 4).unwrap(), 8, "{what}");
                assert_eq!(f.offset_of("level", 4).unwrap(), 12, "{what}");
                assert_eq!(f.offset_of("id", 8).unwrap(), 16, "{what}");
                assert_eq!(f.offset_of("path", 4).unwrap(), 24, "{what}");
                let path = f.field("path").unwrap();
                assert!(path.data_loc && !path.rel_loc, "{what}");
                assert_eq!(f.field("id").unwrap().c_type, "u64");
                assert!(f.print_flags().is_empty());
            }
        }
    }

    #[test]
    fn common_fields_and_header() {
        let f = fixture("6.18", "kmem", "kmalloc");
        assert_eq!(
            (f.system.as_str(), f.name.as_str(), f.id),
            ("kmem", "kmalloc", 658)
        );
        let names: Vec<&str> = f.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "common_type",
                "common_flags",
                "common_preempt_count",
                "common_pid",
                "call_site",
                "ptr",
                "bytes_req",
                "bytes_alloc",
                "gfp_flags",
                "node"
            ]
        );
        let pid = f.field("common_pid").unwrap();
        assert_eq!(
            (pid.offset, pid.size, pid.signed, pid.c_type.as_str()),
            (4, 4, true, "int")
        );
        assert_eq!(f.field("ptr").unwrap().c_type, "const void *");
        assert!(f.print_fmt.starts_with("\"call_site=%pS ptr=%p"));
    }

    const MINIMAL: &str = "name: ev\nID: 7\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n";

    fn with_field(line: &str) -> String {
        format!("{MINIMAL}\t{line}\n\nprint fmt: \"\"\n")
    }

    #[test]
    fn arrays_and_dynamic_fields() {
        let text = [
            "field:char comm[16];\toffset:8;\tsize:16;\tsigned:0;",
            "field:u8 grid[2][4];\toffset:24;\tsize:8;\tsigned:0;",
            "field:__rel_loc char[] msg;\toffset:32;\tsize:4;\tsigned:0;",
            "field:__data_loc unsigned long[] mask;\toffset:36;\tsize:4;\tsigned:0;",
        ]
        .iter()
        .fold(MINIMAL.to_string(), |acc, l| format!("{acc}\t{l}\n"));
        let f = EventFormat::parse("sys", "ev", &text).unwrap();
        let comm = f.field("comm").unwrap();
        assert_eq!(
            (comm.c_type.as_str(), comm.size, comm.data_loc),
            ("char[16]", 16, false)
        );
        assert_eq!(f.field("grid").unwrap().c_type, "u8[2][4]");
        let msg = f.field("msg").unwrap();
        assert!(msg.data_loc && msg.rel_loc);
        assert_eq!((msg.c_type.as_str(), msg.offset), ("char[]", 32));
        let mask = f.field("mask").unwrap();
        assert!(mask.data_loc && !mask.rel_loc);
        assert_eq!(mask.c_type, "unsigned long[]");
    }

    #[test]
    fn missing_offset_is_an_error_naming_the_field() {
        let err = EventFormat::parse("sys", "ev", &with_field("field:int x;\tsize:4;\tsigned:1;"))
            .unwrap_err();
        assert!(
            matches!(err, FormatError::BadLine { line: 5, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("sys/ev") && msg.contains("int x") && msg.contains("offset"),
            "{msg}"
        );
    }

    #[test]
    fn bad_numbers_and_declarations_are_errors() {
        for line in [
            "field:int x;\toffset:eight;\tsize:4;\tsigned:1;",
            "field:int x;\toffset:70000;\tsize:4;\tsigned:1;",
            "field:int x;\toffset:-1;\tsize:4;\tsigned:1;",
            "field:int x;\toffset:8;\tsize:4;\tsigned:2;",
            "field:int x;\toffset:8;\tsize;\tsigned:1;",
            "field:int x;\toffset:8;",
            "field:x;\toffset:8;\tsize:4;\tsigned:1;",
            "field:int 9x;\toffset:8;\tsize:4;\tsigned:1;",
            "field:int[4];\toffset:8;\tsize:4;\tsigned:1;",
            "field:;\toffset:8;\tsize:4;\tsigned:1;",
        ] {
            let err = EventFormat::parse("sys", "ev", &with_field(line));
            assert!(
                matches!(err, Err(FormatError::BadLine { .. })),
                "{line}: {err:?}"
            );
        }
    }

    #[test]
    fn garbage_is_rejected() {
        let cases = [
            ("", "MissingId"),
            ("hello world\n\x01\x02", "MissingId"),
            ("ID: 5\nformat:\n", "NoFields"),
            ("ID: five\n", "BadLine"),
            ("name: other\nID: 1\n", "NameMismatch"),
            ("<html><body>404</body></html>", "MissingId"),
        ];
        for (text, kind) in cases {
            let err = EventFormat::parse("sys", "ev", text).unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{text:?}: {err:?}");
            assert!(err.to_string().contains("sys/ev"), "{err}");
        }
    }

    #[test]
    fn offset_of_errors_name_event_and_field() {
        let f = fixture("5.10", "kmem", "kmalloc");
        let size = f.offset_of("gfp_flags", 8).unwrap_err();
        assert!(matches!(
            size,
            FormatError::FieldSize {
                expected: 8,
                actual: 4,
                ..
            }
        ));
        let msg = size.to_string();
        assert!(
            msg.contains("kmem/kmalloc") && msg.contains("gfp_flags"),
            "{msg}"
        );
        let missing = f.offset_of("node", 4).unwrap_err().to_string();
        assert!(
            missing.contains("kmem/kmalloc") && missing.contains("`node`"),
            "{missing}"
        );
        assert!(
            missing.contains("bytes_alloc"),
            "lists available fields: {missing}"
        );
    }

    #[test]
    fn expression_evaluator() {
        let cases: &[(&str, Option<u64>)] = &[
            (
                "( unsigned long)(( gfp_t)((((1UL))) << (22)))",
                Some(0x40_0000),
            ),
            ("(unsigned long)(( gfp_t)0x400000u)", Some(0x40_0000)),
            ("(__force gfp_t)0x10u", Some(0x10)),
            (
                "(unsigned long)((( gfp_t)(0x400u|0x800u)) | (( gfp_t)0x40u))",
                Some(0xc40),
            ),
            ("0x0f & 0x3c", Some(0xc)),
            ("1 | 2 & 3", Some(3)),
            ("(1 | 2) & 1", Some(1)),
            ("1 + 2 * 3", Some(7)),
            ("1 << 2 + 1", Some(8)),
            ("0x100 >> 4", Some(0x10)),
            ("5 ^ 1", Some(4)),
            ("010", Some(8)),
            ("0", Some(0)),
            ("12345", Some(12345)),
            ("1ULL << 63", Some(1 << 63)),
            ("1lu", Some(1)),
            ("0XFFu", Some(255)),
            // `~` and negative values follow C's widths and sign extension.
            ("~(( gfp_t)0)", Some(0xffff_ffff)),
            ("(unsigned long)~0", Some(u64::MAX)),
            ("~0u", Some(0xffff_ffff)),
            ("~0UL", Some(u64::MAX)),
            ("-1", Some(u64::MAX)),
            ("(unsigned int)-1", Some(0xffff_ffff)),
            ("0xffffffff", Some(0xffff_ffff)),
            ("(long)0xffffffff", Some(0xffff_ffff)),
            ("(int)0xffffffff", Some(u64::MAX)),
            ("~0x7fffffff", Some(0xffff_ffff_8000_0000)),
            ("~0x80000000", Some(0x7fff_ffff)),
            ("0x00000001u & ~(( gfp_t)0x0u)", Some(1)),
            ("-8 >> 1", Some((-4i64) as u64)),
            // Not evaluable: give nothing rather than something.
            ("", None),
            ("REC->gfp_flags", None),
            ("((void *)0)", None),
            ("(struct foo)1", None),
            ("1 << 32", None),
            ("1UL << 64", None),
            ("1 << -1", None),
            ("08", None),
            ("0x", None),
            ("1LUL", None),
            ("1.5", None),
            ("1 +", None),
            ("(1", None),
            ("1)", None),
            ("()", None),
            ("1 2", None),
            ("1 || 2", None),
            ("1 / 1", None),
            ("sizeof(int)", None),
            ("0xFFFFFFFFFFFFFFFFFF", None),
            ("99999999999999999999", None),
            ("9223372036854775808", None),
            ("\"1\"", None),
        ];
        for (expr, expected) in cases {
            assert_eq!(cexpr::eval(expr), *expected, "{expr}");
        }
        assert_eq!(
            cexpr::eval(&format!("{}1{}", "(".repeat(100), ")".repeat(100))),
            Some(1)
        );
        assert_eq!(
            cexpr::eval(&format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000))),
            None
        );
        assert_eq!(cexpr::eval(&"~".repeat(100_000)), None);
        assert_eq!(cexpr::eval(&"(int)".repeat(100_000)), None);
    }

    #[test]
    fn flag_tables_are_scanned_robustly() {
        let f = |fmt: &str| EventFormat {
            system: "s".into(),
            name: "e".into(),
            id: 1,
            fields: Vec::new(),
            print_fmt: fmt.into(),
        };
        let two_tables = f(
            r#""%s %s", __print_flags(REC->a, "|", {1, "A"}, {2, "B"}), __print_flags_u64(REC->b, "|", {4, "C"}, {8, "A"})"#,
        );
        assert_eq!(two_tables.print_flag("B"), Some(2));
        assert_eq!(two_tables.print_flag("C"), Some(4));
        assert_eq!(two_tables.print_flag("A"), None, "conflicting values");
        let same_twice = f(r#"__print_flags(x, "|", {1, "A"}), __print_flags(y, "|", {1, "A"})"#);
        assert_eq!(same_twice.print_flag("A"), Some(1));
        let in_string = f(r#""__print_flags(x, \"|\", {1, \"A\"})", REC->x"#);
        assert!(in_string.print_flags().is_empty());
        let tricky = f(
            r#"__print_flags(REC->f, ",", {(1), "A,B"}, {REC->x, "D"}, {1, N}, {0x2, "E"}, { 0, ((void *)0) })"#,
        );
        assert_eq!(
            tricky.print_flags(),
            [("A,B".to_string(), 1), ("E".to_string(), 2)]
        );
        assert!(f(r#"__print_flags(REC->f, "|", {1, "A"}"#)
            .print_flags()
            .is_empty());
        assert!(f(r#"__print_flags  "#).print_flags().is_empty());
        assert!(f("\"unterminated").print_flags().is_empty());
    }

    /// Cheap deterministic PRNG so the garbling test needs no extra crates and never flakes.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound.max(1) as u64) as usize
        }
    }

    fn garble(text: &str, rng: &mut XorShift) -> String {
        const NOISE: &[u8] = b"(){}[]\",;:<>~|&^0123456789xXuUlL \t\n-+*_aZ\\'";
        let mut bytes = text.as_bytes().to_vec();
        for _ in 0..=rng.next(4) {
            let at = rng.next(bytes.len() + 1);
            let len = rng.next(16).min(bytes.len() - at);
            match rng.next(4) {
                0 => {
                    bytes.drain(at..at + len);
                }
                1 => {
                    let copy = bytes[at..at + len].to_vec();
                    bytes.splice(at..at, copy);
                }
                2 => {
                    for b in &mut bytes[at..at + len] {
                        *b = NOISE[rng.next(NOISE.len())];
                    }
                }
                _ => bytes.insert(at, NOISE[rng.next(NOISE.len())]),
            }
        }
        String::from_utf8(bytes).expect("fixtures and noise are ASCII")
    }

    fn exercise(system: &str, event: &str, text: &str) {
        if let Ok(f) = EventFormat::parse(system, event, text) {
            let _ = f.print_flags();
            let _ = f.print_flag("__GFP_ACCOUNT");
            let _ = f.offset_of("ptr", 8);
            let _ = f.field("name");
        }
    }

    #[test]
    fn truncated_and_garbled_fixtures_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for (_, system, event, text) in all_fixtures() {
            assert!(text.is_ascii());
            // Every truncation of the header and fields, then a sample of the long print fmt.
            let fmt_start = text.find("print fmt").unwrap_or(text.len());
            for cut in (0..fmt_start).chain((fmt_start..=text.len()).step_by(17)) {
                exercise(&system, &event, &text[..cut]);
            }
            for _ in 0..300 {
                exercise(&system, &event, &garble(&text, &mut rng));
            }
        }
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tracefs-test-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_events_from_a_tracefs_layout() {
        // Each fixture kernel directory is laid out like a tracefs root.
        let dir = Path::new(FIXTURES).join("6.18");
        let t = Tracefs::at(&dir);
        assert_eq!(t.root(), dir.as_path());
        assert!(t.has_event("kmem", "kmalloc"));
        assert!(!t.has_event("kmem", "kmalloc_node"));
        let f = t.event_format("kmem", "kmem_cache_alloc").unwrap().unwrap();
        assert_eq!(f.offset_of("bytes_alloc", 8).unwrap(), 40);
        assert!(t.event_format("kmem", "kmalloc_node").unwrap().is_none());
        assert!(t.event_format("nosys", "kmalloc").unwrap().is_none());
        for (system, name) in [
            ("..", "x"),
            ("kmem", "../kmem/kmalloc"),
            ("", "x"),
            ("kmem", ""),
        ] {
            assert!(!t.has_event(system, name));
            let err = t.event_format(system, name).unwrap_err();
            assert!(matches!(err, FormatError::InvalidName { .. }), "{err:?}");
        }
    }

    #[test]
    fn unreadable_format_is_an_io_error_not_absence() {
        let dir = scratch_dir("io");
        // A directory where the file should be makes read_to_string fail without needing
        // permissions (tests may run as root).
        fs::create_dir_all(dir.join("events/kmem/kmalloc/format")).unwrap();
        let err = Tracefs::at(&dir)
            .event_format("kmem", "kmalloc")
            .unwrap_err();
        assert!(matches!(err, FormatError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("kmem/kmalloc/format"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_tracefs_mount_points() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tracefs /sys/kernel/tracing tracefs rw,nosuid 0 0\n\
                      none /mnt/my\\040trace tracefs rw 0 0\n\
                      debugfs /sys/kernel/debug debugfs rw 0 0\n\
                      garbage\n";
        assert_eq!(
            tracefs_mount_points(mounts),
            [
                PathBuf::from("/sys/kernel/tracing"),
                PathBuf::from("/mnt/my trace")
            ]
        );
        assert_eq!(unescape_mount_path(r"a\134b\011c\9"), "a\\b\tc\\9");
        assert_eq!(unescape_mount_path(r"end\04"), r"end\04");
    }

    #[test]
    fn locate_skips_directories_without_events() {
        let dir = scratch_dir("locate");
        let (empty, real) = (dir.join("empty"), dir.join("real"));
        fs::create_dir_all(&empty).unwrap();
        fs::create_dir_all(real.join("events")).unwrap();
        let missing = dir.join("missing");
        assert_eq!(
            locate(&[missing.clone(), empty.clone(), real.clone()]).unwrap(),
            Some(real)
        );
        assert_eq!(locate(&[missing, empty]).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs against the live kernel when it can: the point is that the real path works, but
    /// CI machines without tracefs (or without root) must not fail for it.
    #[test]
    fn live_kernel_when_available() {
        let t = match Tracefs::locate_or_mount() {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("mount -t tracefs") || msg.contains("root"),
                    "{msg}"
                );
                eprintln!("skipping live check: {msg}");
                return;
            }
        };
        let Ok(Some(kmalloc)) = t.event_format("kmem", "kmalloc") else {
            eprintln!(
                "skipping live check: kmem:kmalloc not readable under {}",
                t.root().display()
            );
            return;
        };
        assert!(kmalloc.offset_of("ptr", 8).is_ok());
        assert!(kmalloc.field("gfp_flags").is_some());
        // The value moved between 4.x and 5.x; any kernel we support has it in the table.
        assert!(kmalloc.print_flag("__GFP_ACCOUNT").is_some());
        assert!(t
            .event_format("kmem", "no_such_event_here")
            .unwrap()
            .is_none());
    }

    use crate::test_rng::Rng;

    /// What a garbled format file tends to contain: C punctuation, digits,
    /// the keys the parser looks for, and bytes that are not text at all.
    const PIECES: [&str; 24] = [
        "(",
        ")",
        "{",
        "}",
        ",",
        "\"",
        ";",
        "<<",
        ">>",
        "|",
        "&",
        "~",
        "-",
        "0x",
        "9",
        "18446744073709551615",
        "(unsigned long)",
        "offset:",
        "size:",
        "signed:",
        "field:",
        "\u{0}",
        "\u{fffd}",
        "\n",
    ];

    fn corrupt(rng: &mut Rng, text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        // Aim half of the edits at print fmt, where the expression evaluator runs.
        let fmt_at = text.find("print fmt:").unwrap_or(0);
        for _ in 0..1 + rng.below(6) {
            let at = if rng.below(2) == 0 {
                fmt_at + rng.below(bytes.len().saturating_sub(fmt_at))
            } else {
                rng.below(bytes.len())
            }
            .min(bytes.len());
            match rng.below(5) {
                0 if at < bytes.len() => bytes[at] = rng.next() as u8,
                1 => {
                    let piece = PIECES[rng.below(PIECES.len())];
                    bytes.splice(at..at, piece.bytes());
                }
                2 => {
                    let end = (at + 1 + rng.below(40)).min(bytes.len());
                    bytes.drain(at..end);
                }
                3 => {
                    let end = (at + rng.below(200)).min(bytes.len());
                    let copy = bytes[at..end].to_vec();
                    let to = rng.below(bytes.len());
                    bytes.splice(to..to, copy);
                }
                _ => bytes.truncate(at),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn field_lines(text: &str) -> Vec<&str> {
        text.lines()
            .map(str::trim)
            .filter(|l| strip_field_prefix(l).is_some())
            .collect()
    }

    /// Randomly corrupted and truncated copies of every real format file:
    /// parsing, field lookups and the flag tables give errors or answers, never
    /// a panic; and a layout comes only from the field lines, so where those
    /// survived intact the fields are exactly the real ones.
    #[test]
    fn corrupted_formats_error_and_never_panic_or_misplace_a_field() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut parsed, mut intact) = (0, 0);
        for (kernel, system, event, text) in all_fixtures() {
            let good = EventFormat::parse(&system, &event, &text).expect("real fixture");
            for round in 0..300 {
                let bad = corrupt(&mut rng, &text);
                let Ok(fmt) = EventFormat::parse(&system, &event, &bad) else {
                    continue;
                };
                parsed += 1;
                for f in &good.fields {
                    let _ = fmt.offset_of(&f.name, f.size);
                }
                let flags = fmt.print_flags();
                for (name, _) in flags.iter().take(8) {
                    let _ = fmt.print_flag(name);
                }
                if field_lines(&bad) == field_lines(&text) {
                    intact += 1;
                    assert_eq!(
                        fmt.fields, good.fields,
                        "{kernel} {system}/{event} round {round}: a layout not from its field lines"
                    );
                }
            }
        }
        assert!(
            parsed > 1000,
            "too few corrupted formats parsed ({parsed}) to exercise lookups"
        );
        assert!(
            intact > 500,
            "too few with intact field lines ({intact}) to check layouts"
        );
    }

    /// The evaluator on garbage: random token soup, real table entries with
    /// bytes changed, absurd shifts and nesting: a value or None, never a panic.
    #[test]
    fn the_expression_evaluator_survives_garbage() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let tokens = [
            "(",
            ")",
            "(unsigned long)",
            "(int)",
            "(unsigned int)",
            "(long)",
            "(gfp_t)",
            "~",
            "-",
            "<<",
            ">>",
            "|",
            "&",
            "^",
            "*",
            "+",
            "0",
            "1",
            "63",
            "64",
            "4294967295",
            "0xffffffffffffffff",
            "99999999999999999999999",
            "(( gfp_t)",
            "1u",
            "1ul",
            "x",
        ];
        let mut real = Vec::new();
        for (_, _, _, text) in all_fixtures() {
            let fmt = text
                .split("print fmt:")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            for args in print_flag_calls(&fmt) {
                real.extend(
                    split_top_level(args)
                        .unwrap_or_default()
                        .iter()
                        .map(|a| a.to_string()),
                );
            }
        }
        assert!(!real.is_empty(), "no flag tables in the fixtures");
        for _ in 0..20_000 {
            let n = 1 + rng.below(12);
            let soup: Vec<&str> = (0..n).map(|_| tokens[rng.below(tokens.len())]).collect();
            let _ = cexpr::eval(&soup.join(" "));
            let mut entry = real[rng.below(real.len())].clone().into_bytes();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(entry.len());
                if at < entry.len() {
                    entry[at] = tokens[rng.below(tokens.len())].as_bytes()[0];
                }
            }
            let entry = String::from_utf8_lossy(&entry);
            let _ = flag_entry(&entry);
            let _ = cexpr::eval(&entry);
        }
        for expr in [
            "1 << 64",
            "1 << 18446744073709551615",
            "-9223372036854775808 * -1",
            "~0 >> 999",
        ] {
            let _ = cexpr::eval(expr);
        }
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(cexpr::eval(&deep), None, "nesting is bounded");
        let casts = format!("{}1", "(unsigned long)".repeat(100_000));
        let _ = cexpr::eval(&casts);
    }
}
