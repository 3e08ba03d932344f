//! Reading the metadata of a RESULT of kind Rows (protocol v3 to v5), far enough to find a
//! column and the cells that hold it, so that a fixed-size value can be patched in place.

use super::body::{BodyError, Reader, result_kind};

mod flags {
    pub const GLOBAL_TABLES_SPEC: i32 = 0x0001;
    pub const HAS_MORE_PAGES: i32 = 0x0002;
    pub const NO_METADATA: i32 = 0x0004;
    /// v5: a new result metadata id follows the paging state.
    pub const METADATA_CHANGED: i32 = 0x0008;
}

/// CQL type id of `int`.
pub const TYPE_INT: u16 = 0x0009;
/// Deepest nesting of collection, UDT and tuple types read.
const MAX_TYPE_DEPTH: usize = 32;

/// Where the cells of one column of a Rows result are: the offsets (in the message) of
/// each row's value, with its length (-1 for null).
#[derive(Debug, PartialEq, Eq)]
pub struct ColumnCells {
    pub type_id: u16,
    pub cells: Vec<(usize, i32)>,
}

/// Finds column `column` of table `keyspace.table` in a RESULT message (the body after
/// tracing id, warnings and custom payload). `Ok(None)` when the message is not Rows, has no
/// metadata, or is of another table or has no such column.
pub fn find_column(
    message: &[u8],
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<Option<ColumnCells>, BodyError> {
    let mut r = Reader::new(message);
    if r.int()? != result_kind::ROWS {
        return Ok(None);
    }
    let flags = r.int()?;
    let count = usize::try_from(r.int()?).map_err(|_| BodyError("negative column count"))?;
    if flags & flags::HAS_MORE_PAGES != 0 {
        r.bytes()?;
    }
    if flags & flags::METADATA_CHANGED != 0 {
        r.short_bytes()?;
    }
    if flags & flags::NO_METADATA != 0 {
        return Ok(None);
    }
    let global = if flags & flags::GLOBAL_TABLES_SPEC != 0 {
        Some((r.string()?, r.string()?))
    } else {
        None
    };
    let mut wanted = None;
    for index in 0..count {
        let (ks, tb) = match global {
            Some(spec) => spec,
            None => (r.string()?, r.string()?),
        };
        let name = r.string()?;
        let type_id = r.short()?;
        skip_type_args(&mut r, type_id, 0)?;
        if ks == keyspace && tb == table && name == column {
            wanted = Some((index, type_id));
        }
    }
    let Some((index, type_id)) = wanted else {
        return Ok(None);
    };
    let rows = usize::try_from(r.int()?).map_err(|_| BodyError("negative row count"))?;
    let mut cells = Vec::with_capacity(rows.min(4096));
    for _ in 0..rows {
        for i in 0..count {
            let at = message.len() - r.remaining();
            let len = r.int()?;
            if len > 0 {
                r.skip(len as usize)?;
            }
            if i == index {
                cells.push((at + 4, len));
            }
        }
    }
    Ok(Some(ColumnCells { type_id, cells }))
}

/// Skips the arguments of a type option (collections, UDTs, tuples, custom types).
fn skip_type_args(r: &mut Reader<'_>, type_id: u16, depth: usize) -> Result<(), BodyError> {
    if depth > MAX_TYPE_DEPTH {
        return Err(BodyError("type nested too deeply"));
    }
    let option = |r: &mut Reader<'_>| {
        let id = r.short()?;
        skip_type_args(r, id, depth + 1)
    };
    match type_id {
        0x0000 => {
            r.string()?;
        }
        0x0020 | 0x0022 => option(r)?,
        0x0021 => {
            option(r)?;
            option(r)?;
        }
        0x0030 => {
            r.string()?;
            r.string()?;
            for _ in 0..r.short()? {
                r.string()?;
                option(r)?;
            }
        }
        0x0031 => {
            for _ in 0..r.short()? {
                option(r)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u16).to_be_bytes());
        out.extend(s.as_bytes());
    }

    /// A Rows result of `system.peers_v2` with columns (peer inet, tokens set<varchar>,
    /// native_port int, extra map<text, frozen<tuple<int, text>>>), two rows.
    pub fn peers_rows(global: bool, ports: &[Option<i32>]) -> Vec<u8> {
        let mut out = result_kind::ROWS.to_be_bytes().to_vec();
        let flags = if global { flags::GLOBAL_TABLES_SPEC } else { 0 } | flags::HAS_MORE_PAGES;
        out.extend(flags.to_be_bytes());
        out.extend(4i32.to_be_bytes());
        out.extend(3i32.to_be_bytes());
        out.extend([1, 2, 3]);
        if global {
            string(&mut out, "system");
            string(&mut out, "peers_v2");
        }
        let columns: [(&str, &[u8]); 4] = [
            ("peer", &[0x00, 0x10]),
            ("tokens", &[0x00, 0x22, 0x00, 0x0D]),
            ("native_port", &[0x00, 0x09]),
            (
                "extra",
                &[
                    0x00, 0x21, 0x00, 0x0D, 0x00, 0x31, 0x00, 0x02, 0x00, 0x09, 0x00, 0x0D,
                ],
            ),
        ];
        for (name, ty) in columns {
            if !global {
                string(&mut out, "system");
                string(&mut out, "peers_v2");
            }
            string(&mut out, name);
            out.extend(ty);
        }
        out.extend((ports.len() as i32).to_be_bytes());
        for port in ports {
            out.extend(4i32.to_be_bytes());
            out.extend([127, 0, 0, 2]);
            out.extend(6i32.to_be_bytes());
            out.extend([0, 0, 0, 1, b'x', 0]);
            match port {
                Some(p) => {
                    out.extend(4i32.to_be_bytes());
                    out.extend(p.to_be_bytes());
                }
                None => out.extend((-1i32).to_be_bytes()),
            }
            out.extend((-1i32).to_be_bytes());
        }
        out
    }

    #[test]
    fn the_native_port_cells_of_peers_v2_are_found_with_either_table_spec() {
        for global in [true, false] {
            let message = peers_rows(global, &[Some(9042), None]);
            let found = find_column(&message, "system", "peers_v2", "native_port")
                .expect("readable")
                .expect("found");
            assert_eq!(found.type_id, TYPE_INT);
            assert_eq!(found.cells.len(), 2);
            let (at, len) = found.cells[0];
            assert_eq!(len, 4);
            assert_eq!(&message[at..at + 4], &9042i32.to_be_bytes());
            assert_eq!(found.cells[1].1, -1);
        }
    }

    /// v5 Rows may say their metadata changed: the new metadata id sits after the paging
    /// state.
    #[test]
    fn a_v5_new_metadata_id_is_skipped() {
        let mut message = peers_rows(true, &[Some(9042)]);
        let flags = i32::from_be_bytes(message[4..8].try_into().expect("4 bytes"));
        message[4..8].copy_from_slice(&(flags | flags::METADATA_CHANGED).to_be_bytes());
        // kind(4) flags(4) count(4) paging state(4 + 3)
        message.splice(19..19, [0, 2, 0xAB, 0xCD]);
        let found = find_column(&message, "system", "peers_v2", "native_port")
            .expect("readable")
            .expect("found");
        let (at, _) = found.cells[0];
        assert_eq!(&message[at..at + 4], &9042i32.to_be_bytes());
    }

    #[test]
    fn other_tables_results_and_truncated_messages_are_left_alone() {
        let message = peers_rows(true, &[Some(9042)]);
        assert_eq!(
            find_column(&message, "system", "peers", "native_port"),
            Ok(None)
        );
        assert_eq!(
            find_column(&message, "system", "peers_v2", "port"),
            Ok(None)
        );
        assert_eq!(
            find_column(&result_kind::VOID.to_be_bytes(), "a", "b", "c"),
            Ok(None)
        );
        for cut in 4..message.len() - 1 {
            // Never a panic: an error, or nothing found.
            let _ = find_column(&message[..cut], "system", "peers_v2", "native_port");
        }
        assert!(
            find_column(
                &message[..message.len() - 2],
                "system",
                "peers_v2",
                "native_port"
            )
            .is_err()
        );
    }
}
