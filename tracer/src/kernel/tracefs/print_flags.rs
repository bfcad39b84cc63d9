//! The `__print_flags(REC->x, "|", {EXPR, "NAME"}, ...)` tables of a `print fmt` line:
//! where GFP bit values come from on the running kernel.

use super::{cexpr, is_ident_char};

/// The argument text (between the parentheses) of each `__print_flags(...)` call.
pub(super) fn print_flag_calls(fmt: &str) -> Vec<&str> {
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

pub(super) fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Index just past the closing quote of the literal opening at `open`; `None` if unterminated.
pub(super) fn skip_quoted(bytes: &[u8], open: usize) -> Option<usize> {
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
pub(super) fn matching_close(bytes: &[u8], open: usize) -> Option<usize> {
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
pub(super) fn split_top_level(text: &str) -> Option<Vec<&str>> {
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
pub(super) fn flag_entry(arg: &str) -> Option<(String, u64)> {
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
pub(super) fn string_literal(text: &str) -> Option<String> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains(['"', '\\']) {
        return None;
    }
    Some(inner.to_string())
}
