//! Parsing one tracefs `events/<system>/<event>/format` file: fields, offsets, sizes and
//! the `print fmt` line, with errors that name the file, event and field.

use std::io;
use std::path::PathBuf;

use super::is_ident_char;
use super::print_flags::{flag_entry, print_flag_calls, split_top_level};

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
        /// The sizes accepted, e.g. `8` or `4 or 8`.
        expected: String,
        actual: u16,
    },
    #[error("tracepoint {event}: field `{field}` is not a __data_loc string on this kernel")]
    NotDataLoc { event: String, field: String },
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

    /// A field the caller cannot do without; the error names the event and lists the fields
    /// this kernel's record has.
    pub fn required(&self, name: &str) -> Result<&Field, FormatError> {
        self.field(name).ok_or_else(|| FormatError::MissingField {
            event: self.event_name(),
            field: name.to_string(),
            available: self.field_names(),
        })
    }

    /// Offset of a required field, checking its size (e.g. 8 for a pointer); error names the
    /// event and field.
    pub fn offset_of(&self, name: &str, size: u16) -> Result<u16, FormatError> {
        self.offset_of_any(name, &[size])
    }

    /// Offset of a required field whose size is one of `sizes` (a `gfp_t` is 4 bytes on most
    /// kernels and 8 on some); error names the event, the field and the sizes accepted.
    pub fn offset_of_any(&self, name: &str, sizes: &[u16]) -> Result<u16, FormatError> {
        let field = self.required(name)?;
        if !sizes.contains(&field.size) {
            let expected: Vec<String> = sizes.iter().map(u16::to_string).collect();
            return Err(FormatError::FieldSize {
                event: self.event_name(),
                field: name.to_string(),
                expected: expected.join(" or "),
                actual: field.size,
            });
        }
        Ok(field.offset)
    }

    /// Offset of a required `__data_loc` string field (its descriptor's offset in the record).
    /// A `__rel_loc` one is refused: its string is found from the end of the descriptor, which
    /// the eBPF programs do not do.
    pub fn data_loc_offset(&self, name: &str) -> Result<u16, FormatError> {
        let field = self.required(name)?;
        if !field.data_loc || field.rel_loc {
            return Err(FormatError::NotDataLoc {
                event: self.event_name(),
                field: name.to_string(),
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
pub(super) fn strip_field_prefix(line: &str) -> Option<&str> {
    line.strip_prefix("field:")
        .or_else(|| line.strip_prefix("field special:"))
}

/// Parses what follows `field:`, e.g. `unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;`.
pub(super) fn parse_field(rest: &str) -> Result<Field, String> {
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

pub(super) fn parse_u16(decl: &str, key: &str, value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .map_err(|_| format!("field `{decl}`: {key} `{value}` is not a number in 0..=65535"))
}

pub(super) fn parse_signed(decl: &str, value: &str) -> Result<bool, String> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("field `{decl}`: signed `{value}` is not 0 or 1")),
    }
}

pub(super) struct Decl {
    name: String,
    c_type: String,
    data_loc: bool,
    rel_loc: bool,
}

/// Splits a C declaration like `char comm[16]` or `__data_loc char[] name` into name and type.
pub(super) fn parse_decl(decl: &str) -> Result<Decl, String> {
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
pub(super) fn split_array_dims(decl: &str) -> (&str, &str) {
    let mut base = decl;
    while base.ends_with(']') {
        match base.rfind('[') {
            Some(open) => base = base[..open].trim_end(),
            None => break,
        }
    }
    (base, &decl[base.len()..])
}
