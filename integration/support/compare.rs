//! Field-by-field comparison of two sets of flows, with a report that says what differs.

use ctsync::flow::{status, Flow, FlowKey};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// Examples printed per kind of difference.
const SAMPLES: usize = 5;

fn index<'a>(
    what: &str,
    flows: &'a [Flow],
    errors: &mut Vec<String>,
) -> HashMap<FlowKey, &'a Flow> {
    let mut map = HashMap::with_capacity(flows.len());
    for f in flows {
        if map.insert(f.key, f).is_some() {
            errors.push(format!("{what} holds {:?} twice", f.key));
        }
    }
    map
}

fn status_names(st: u32) -> String {
    let names: Vec<&str> = status::NAMES
        .iter()
        .filter(|(bit, _)| st & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{st:#x} [{}]", names.join("|"))
}

/// The fields in which `a` and `b` differ, with both values; timeouts within `slack` seconds
/// of each other are equal.
pub fn field_diffs(a: &Flow, b: &Flow, slack: u32) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    macro_rules! field {
        ($name:literal, $get:expr) => {{
            let (x, y) = ($get(a), $get(b));
            if x != y {
                out.push(($name, format!("{x:?}"), format!("{y:?}")));
            }
        }};
    }
    field!("reply", |f: &Flow| f.reply);
    if a.status != b.status {
        out.push(("status", status_names(a.status), status_names(b.status)));
    }
    if a.timeout.abs_diff(b.timeout) > slack {
        out.push((
            "timeout",
            a.timeout.to_string(),
            format!("{} (tolerance {slack} s)", b.timeout),
        ));
    }
    field!("mark", |f: &Flow| f.mark);
    if a.labels() != b.labels() {
        out.push((
            "labels",
            format!("{:#034x}", a.labels()),
            format!("{:#034x}", b.labels()),
        ));
    }
    field!("protoinfo", |f: &Flow| f.protoinfo());
    field!("helper", |f: &Flow| f.helper().map(str::to_owned));
    field!("master", |f: &Flow| f.master().copied());
    field!("seq_adj", |f: &Flow| f.seq_adj().copied());
    field!("synproxy", |f: &Flow| f.synproxy().copied());
    out
}

/// Compares `expected` with `actual` flow by flow and field by field.
///
/// `Ok` when both hold exactly the same keys and every field is equal (timeouts within
/// `slack` seconds); otherwise a report of missing, extra and differing flows by field.
pub fn diff(
    expected_name: &str,
    expected: &[Flow],
    actual_name: &str,
    actual: &[Flow],
    slack: u32,
) -> Result<(), String> {
    let mut errors = Vec::new();
    let exp = index(expected_name, expected, &mut errors);
    let act = index(actual_name, actual, &mut errors);
    let mut missing = Vec::new();
    let mut fields: BTreeMap<&'static str, (usize, Vec<String>)> = BTreeMap::new();
    let mut differing = 0usize;
    for (key, e) in &exp {
        let Some(a) = act.get(key) else {
            missing.push(*e);
            continue;
        };
        let d = field_diffs(e, a, slack);
        if !d.is_empty() {
            differing += 1;
        }
        for (name, x, y) in d {
            let entry = fields.entry(name).or_default();
            entry.0 += 1;
            if entry.1.len() < SAMPLES {
                entry.1.push(format!(
                    "{}{}: {expected_name} {x}, {actual_name} {y}",
                    key.orig,
                    zone_text(key)
                ));
            }
        }
    }
    let extra: Vec<&Flow> = act
        .iter()
        .filter(|(k, _)| !exp.contains_key(k))
        .map(|(_, f)| *f)
        .collect();
    if errors.is_empty() && missing.is_empty() && extra.is_empty() && differing == 0 {
        return Ok(());
    }
    let mut r = format!(
        "{expected_name} has {} flows, {actual_name} {}: {} only in {expected_name}, {} only in \
         {actual_name}, {differing} differ",
        expected.len(),
        actual.len(),
        missing.len(),
        extra.len()
    );
    for e in errors.iter().take(SAMPLES) {
        let _ = write!(r, "\n  {e}");
    }
    for (name, list) in [(expected_name, &missing), (actual_name, &extra)] {
        for f in list.iter().take(SAMPLES) {
            let _ = write!(r, "\n  only in {name}: {f:?}");
        }
    }
    for (field, (count, samples)) in &fields {
        let _ = write!(r, "\n  field {field} differs in {count} flows, e.g.");
        for s in samples {
            let _ = write!(r, "\n    {s}");
        }
    }
    Err(r)
}

fn zone_text(key: &FlowKey) -> String {
    if key.zone.id == 0 {
        String::new()
    } else {
        format!(" zone {} {:?}", key.zone.id, key.zone.dir)
    }
}
