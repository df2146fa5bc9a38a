//! Running a [`Plan`]: one pipelined transaction, or, after PostgreSQL rejected a row, a
//! transaction that runs each failing call again row by row.

use std::collections::HashMap;
use std::future::poll_fn;
use std::task::Poll;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, TryFutureExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::plan::Plan;
use super::statements::Statements;

/// A row that PostgreSQL rejected and that was left out of its flush.
pub(super) struct RejectedRow {
    pub table: &'static str,
    pub guild_id: i64,
    pub key: Option<i64>,
    pub error: tokio_postgres::Error,
}

impl Plan<'_> {
    /// Runs the plan in one transaction and returns the member count of every guild in
    /// `member_guilds` that has one after it.
    ///
    /// The whole transaction is pipelined: `BEGIN`, the statements, the count read and `COMMIT`
    /// are all sent before the first reply is read, so a flush costs one round trip to the
    /// server. They run in the order sent. After a failed statement the later ones fail too, and
    /// PostgreSQL ends the failed transaction block at `COMMIT` with a rollback, so nothing of
    /// the plan is kept. The first error in plan order is the one returned.
    pub async fn execute(
        &self,
        client: &Client,
        statements: &Statements,
    ) -> Result<HashMap<i64, i64>, tokio_postgres::Error> {
        let params: Vec<_> = self
            .calls
            .iter()
            .map(|call| call.columns.params())
            .collect();
        let count_params: [&(dyn ToSql + Sync); 1] = [&self.member_guilds];
        let no_rows = |_| Vec::new();

        let mut requests: Vec<BoxFuture<'_, Result<Vec<Row>, tokio_postgres::Error>>> =
            Vec::with_capacity(self.calls.len() + 3);
        requests.push(
            client
                .execute(&statements.begin, &[])
                .map_ok(no_rows)
                .boxed(),
        );
        for (call, params) in self.calls.iter().zip(&params) {
            let request = client.execute(call.statement, params).map_ok(no_rows);
            requests.push(request.boxed());
        }
        let counts = client.query(&statements.read_member_counts, &count_params);
        requests.push(counts.boxed());
        requests.push(
            client
                .execute(&statements.commit, &[])
                .map_ok(no_rows)
                .boxed(),
        );

        let mut replies = pipeline(requests).await;
        let commit = replies.pop();
        let counts = replies.pop();
        if let Some(error) = replies.into_iter().find_map(Result::err) {
            return Err(error);
        }
        let counts = counts.unwrap_or_else(|| Ok(Vec::new()))?;
        if let Some(Err(error)) = commit {
            return Err(error);
        }
        Ok(read_counts(&counts))
    }

    /// Runs the plan in one transaction like [`Plan::execute`], but leaves out each row that
    /// PostgreSQL rejects with a data error and returns those rows.
    ///
    /// Each call runs under a savepoint, and a call that fails is run again row by row, so the
    /// cost stays low unless many rows are bad. Any other error ends the attempt.
    pub async fn execute_isolated(
        &self,
        client: &mut Client,
        statements: &Statements,
    ) -> Result<(HashMap<i64, i64>, Vec<RejectedRow>), tokio_postgres::Error> {
        let mut transaction = client.transaction().await?;
        let mut rejected = Vec::new();

        for call in &self.calls {
            let savepoint = transaction.savepoint("call").await?;
            match savepoint
                .execute(call.statement, &call.columns.params())
                .await
            {
                Ok(_) => {
                    savepoint.commit().await?;
                    continue;
                }
                Err(error) if is_data_error(&error) => savepoint.rollback().await?,
                Err(error) => return Err(error),
            }

            for index in 0..call.columns.len() {
                let row = call.columns.range(index, index + 1);
                let savepoint = transaction.savepoint("row").await?;
                match savepoint.execute(call.statement, &row.params()).await {
                    Ok(_) => savepoint.commit().await?,
                    Err(error) if is_data_error(&error) => {
                        savepoint.rollback().await?;
                        let (guild_id, key) = call.columns.describe(index);
                        rejected.push(RejectedRow {
                            table: call.table,
                            guild_id,
                            key,
                            error,
                        });
                    }
                    Err(error) => return Err(error),
                }
            }
        }

        let counts = transaction
            .query(&statements.read_member_counts, &[&self.member_guilds])
            .await?;
        transaction.commit().await?;
        Ok((read_counts(&counts), rejected))
    }
}

/// Polls the requests in order until all are done and returns their results in that order.
///
/// tokio-postgres sends a request when its future is first polled, so polling in list order
/// sends them in list order. `join_all` (futures-util 0.3) polls through `FuturesOrdered`
/// above 30 futures, which promises no first-poll order.
async fn pipeline<T>(mut requests: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut replies: Vec<Option<T>> = requests.iter().map(|_| None).collect();
    poll_fn(|context| {
        let mut done = true;
        for (request, reply) in requests.iter_mut().zip(replies.iter_mut()) {
            if reply.is_some() {
                continue;
            }
            match request.as_mut().poll(context) {
                Poll::Ready(value) => *reply = Some(value),
                Poll::Pending => done = false,
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    replies.into_iter().flatten().collect()
}

fn read_counts(rows: &[Row]) -> HashMap<i64, i64> {
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// Returns whether PostgreSQL rejected the rows of a statement, which retrying the same rows
/// cannot fix. These are the SQLSTATE classes 21 (cardinality violation, such as an upsert that
/// touches one row twice), 22 (data exception), 23 (integrity constraint violation) and 54
/// (program limit exceeded). Any other error is retried as it is.
pub(super) fn is_data_error(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(&code.code()[..2], "21" | "22" | "23" | "54"))
}
