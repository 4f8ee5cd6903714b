//! The kernel's table of a namespace, read and written through the ctsync library.

use super::netns::Netns;
use ctsync::flow::Flow;
use ctsync::netlink::{self, CtSocket, Origins, WriteReport, Writer};

/// Every entry of the namespace's table, as the library decodes a full dump.
///
/// Panics if an entry cannot be decoded: the tests only create entries ctsync models.
pub fn dump(ns: &Netns) -> Vec<Flow> {
    let name = ns.name().to_string();
    ns.run_in(move || {
        let sock = CtSocket::open().map_err(|e| format!("open: {e}"))?;
        let mut flows = Vec::new();
        let undecodable =
            netlink::dump(&sock, |m| flows.push(m.flow)).map_err(|e| format!("dump: {e}"))?;
        if undecodable != 0 {
            return Err(format!("{undecodable} undecodable entries in {name}"));
        }
        Ok(flows)
    })
    .unwrap_or_else(|e: String| panic!("kernel dump failed: {e}"))
}

/// A batched writer with `sockets` sockets opened in the namespace.
pub fn writer(ns: &Netns, sockets: usize) -> Writer {
    ns.run_in(move || Writer::open(sockets, &Origins::new()).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("cannot open writer: {e}"))
}

/// Upserts `flows` in batches of `batch` flows, summing the reports.
pub fn upsert_batched(w: &mut Writer, flows: &[Flow], batch: usize) -> WriteReport {
    let mut total = WriteReport::default();
    for chunk in flows.chunks(batch.max(1)) {
        let r = w
            .upsert(chunk)
            .unwrap_or_else(|e| panic!("upsert failed as a whole: {e}"));
        total.created += r.created;
        total.updated += r.updated;
        total.replaced += r.replaced;
        total.deleted += r.deleted;
        total.absent += r.absent;
        total.failures.extend(r.failures);
    }
    total
}

/// Short text of a report, failures summarised.
pub fn describe(r: &WriteReport) -> String {
    let mut s = format!(
        "created={} updated={} replaced={} deleted={} absent={} failures={}",
        r.created,
        r.updated,
        r.replaced,
        r.deleted,
        r.absent,
        r.failures.len()
    );
    for f in r.failures.iter().take(5) {
        s.push_str(&format!(
            "\n  {} {:?}: {} ({})",
            f.op, f.key, f.error, f.errno
        ));
    }
    s
}
