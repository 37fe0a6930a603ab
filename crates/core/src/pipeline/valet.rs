//! Phases 7 to 10 of a valet-key route ([`crate::backend::blob_sas`]): the request checked,
//! the isolate's user delegation key (fetched once for all callers when there is none), a URL
//! signed with it, the caller's answer. Nothing is sent to Azure on a request that finds a key:
//! such requests need neither Storage nor the identity provider.

use super::Gateway;
use crate::backend::{answer_text, blob_sas, send_retried, Resend};
use crate::breaker::resource_of;
use crate::exchange::{Answer, Bearer, Cx, Io, Limit, OutBody};
use crate::identity::cache::Lookup;
use crate::policy::prepared::PreparedBlobSas;
use crate::problem::Problem;
use crate::sas::HeldKey;

/// How long a waiting caller sleeps between looks at the key cache, in milliseconds.
const WAIT_POLL_MS: f64 = 5.0;
/// Time limit of one Get User Delegation Key attempt.
const KEY_TIMEOUT_MS: f64 = 10_000.0;
/// Where a key's refresh point lies in its usable life.
const REFRESH_SHARE: f64 = 0.5;

impl Gateway {
    pub(super) async fn valet<I: Io>(
        &self,
        s: &PreparedBlobSas,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        // 7. build: the name and values checked before any key is fetched.
        let plan = blob_sas::build(s, cx, io)?;
        // 8–9. the key
        let key = self.delegation_key(s, cx, io).await?;
        // 10. answer
        let minted = blob_sas::mint(s, &plan, &key.key, io.now());
        cx.log.minted = Some(crate::exchange::Minted {
            blob: plan.name.clone(),
            permission: s.permission.as_str(),
            expires: minted.expires.clone(),
        });
        Ok(blob_sas::answer(s, &plan, &minted))
    }

    /// The isolate's key for the route's account and identity: from the cache; fetched by
    /// one caller while the others wait; refreshed by the caller that finds it past its
    /// refresh point (with the old key served if the refresh fails). A fetch that failed
    /// moments ago is every waiting caller's answer until its back-off ends.
    async fn delegation_key<I: Io>(
        &self,
        s: &PreparedBlobSas,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<HeldKey, Problem> {
        let mut waited = false;
        loop {
            let lookup = self
                .delegation_keys
                .borrow_mut()
                .lookup(&s.key_id, io.now());
            let (key, source) = match lookup {
                Lookup::Hit {
                    value,
                    refresh: false,
                } => (value, if waited { "waited" } else { "cache" }),
                // The core cannot work past its answer: this caller refreshes for all.
                Lookup::Hit {
                    value,
                    refresh: true,
                } => match self.fetch_key(s, cx, io).await {
                    Ok(fresh) => (fresh, "refreshed"),
                    Err(_) => (value, "cache_refresh_failed"),
                },
                Lookup::Fetch => (self.fetch_key(s, cx, io).await?, "fetched"),
                Lookup::Wait => {
                    waited = true;
                    io.sleep(WAIT_POLL_MS).await;
                    continue;
                }
                Lookup::Failed(problem) => return Err(problem),
            };
            cx.log.key = Some(source);
            return Ok(key);
        }
    }

    /// One fetch, its outcome told to the cache.
    async fn fetch_key<I: Io>(
        &self,
        s: &PreparedBlobSas,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<HeldKey, Problem> {
        // Other callers wait on this fetch: it finishes even if this request's caller goes.
        io.hold();
        let result = self.request_key(s, cx, io).await;
        self.delegation_keys.borrow_mut().complete(
            &s.key_id,
            result.clone(),
            io.now(),
            REFRESH_SHARE,
            io.random(),
        );
        result
    }

    /// Get User Delegation Key, through the host's breakers, with the identity's token
    /// (renewed once on a 401), tried again on 429 and 5xx (it changes nothing at Storage).
    async fn request_key<I: Io>(
        &self,
        s: &PreparedBlobSas,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<HeldKey, Problem> {
        let (request, body) = blob_sas::key_request(s, io.now());
        let (call, admitted, grant) = self
            .admit_and_grant(&s.token, resource_of(&request.url), cx, io)
            .await
            .map_err(|(problem, _)| problem)?;
        let bearer = Bearer::new(&s.token, &grant);
        let sent = send_retried(
            io,
            &request,
            &bearer,
            OutBody::Text(&body),
            Limit::Deadline(KEY_TIMEOUT_MS),
            &mut cx.log,
            (Resend::Safe, "Blob Storage"),
            async |reply, _| blob_sas::judge(io, reply).await,
            blob_sas::key_unavailable,
        )
        .await;
        self.settle(cx, &call, admitted, sent.as_ref().err(), io);
        let text = answer_text(io, sent?.body).await.map_err(|why| {
            cx.log.backend_detail = Some(why);
            blob_sas::unusable_answer()
        })?;
        blob_sas::held_key(&text, io.now())
    }
}
