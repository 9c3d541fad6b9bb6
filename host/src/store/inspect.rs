//! The one write of the inspection CLI: `esi-host jobs retry` puts a dead job back to ready.
//!
//! Everything else the inspection commands do is reading (`get`, `list`). This write is kept
//! apart from the protocol's own transactions in [`super::jobs`] because no role of the host
//! runs it: an operator does, while hosts may be running. Like every transaction of the
//! protocol, its safety comes from the compares inside it, not from what the operator saw a
//! moment earlier.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Result, Store};
use crate::keys::Queue;

impl Store {
    /// Re-queues a dead job: puts `/jobs/all/<id>` = `record` and `/jobs/ready/<id>` = `handler`
    /// and deletes `/esi-worker/dead_jobs/<id>`, all in one transaction.
    ///
    /// The compares make it happen at most once and never over a live job:
    /// - `/jobs/all/<id>` must not exist (the job manager cleaned the failed job, and no retry
    ///   or newer write recreated it), nor any queue key of the id (nothing still accounts for
    ///   the job);
    /// - the dead-job key must still be the one that was read (`dead_mod_revision`, which also
    ///   proves it exists): two operators retrying at once re-queue the job once.
    ///
    /// Returns `false` when a compare failed; nothing was written then.
    pub async fn retry_dead_job(
        &self,
        job_id: &str,
        handler: &str,
        record: String,
        dead_mod_revision: i64,
    ) -> Result<bool> {
        let k = self.keys();
        let all = k.job(Queue::All, job_id);
        let dead = k.dead_job(job_id);
        let mut compares = vec![
            Compare::version(all.clone(), CompareOp::Equal, 0),
            Compare::mod_revision(dead.clone(), CompareOp::Equal, dead_mod_revision),
        ];
        compares.extend(
            [
                Queue::Ready,
                Queue::Waiting,
                Queue::Working,
                Queue::Finished,
            ]
            .map(|q| Compare::version(k.job(q, job_id), CompareOp::Equal, 0)),
        );
        let txn = Txn::new().when(compares).and_then([
            TxnOp::put(all, record, None),
            TxnOp::put(k.job(Queue::Ready, job_id), handler, None),
            TxnOp::delete(dead, None),
        ]);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }
}
