//! Service Bus routes at the edge: read the body (capped), build and check the message or
//! batch, get a token, send with retries that reuse the same bytes and `MessageId`.

use worker::{Context, Env, Request, Response};

use super::{
    backend_token, body, cloud, declared_length, http, internal, new_request_id, now, query_pairs,
    tokens, unreadable, Caller, BACKEND_TIMEOUT_MS,
};
use crate::backend::service_bus as sb;
use crate::pipeline::LogLine;
use crate::policy::ServiceBusBackend;
use crate::problem::Problem;
use crate::template::RenderContext;

/// A Service Bus route: build the message (or batch), get a token, send with retries that
/// reuse the same `MessageId`, map the answer. Bodies are read whole: they are bounded by the
/// message size limit, and a retry must send the same bytes.
pub(super) async fn send(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
    backend: &'static ServiceBusBackend,
    caller: &Caller<'_>,
) -> std::result::Result<Response, Problem> {
    let params = caller.params;
    let limit = backend
        .max_message_bytes()
        .min(caller.max_body.map_or(usize::MAX, |m| m as usize));
    if let Some(length) = declared_length(req).filter(|&l| l > limit as u64) {
        return Err(sb::too_large(length as usize, limit));
    }
    let body = read_capped(req, limit).await?;
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let (idempotency_key, traceparent) = (header("idempotency-key"), header("traceparent"));
    let defaults = sb::Defaults {
        idempotency_key: idempotency_key.as_deref(),
        traceparent: traceparent.as_deref(),
        request_id: log.request_id,
    };
    let query = query_pairs(req);
    let values = RenderContext {
        path: params,
        query: &query,
        header: &header,
        request_id: log.request_id,
        uuid: &new_request_id,
        now_ms: now(),
        jwt: caller.claims,
    };

    // Everything is checked before a token is fetched.
    let (payload, ids, props) = if backend.batch {
        let (batch, ids) = sb::batch_body(&body, backend.message.as_ref(), &values, &defaults)?;
        if batch.len() > limit {
            return Err(sb::too_large(batch.len(), limit));
        }
        (batch.into_bytes(), ids, None)
    } else {
        let props = sb::properties(backend.message.as_ref(), &values, &defaults, None)?;
        let size = sb::message_size(body.len(), &props);
        if size > limit {
            return Err(sb::too_large(size, limit));
        }
        let id = props.message_id().to_owned();
        (body, vec![id], Some(props))
    };
    let content_type =
        header("content-type").unwrap_or_else(|| "application/octet-stream".to_owned());
    let base = backend.base_url(cloud());
    let request = match &props {
        Some(props) => sb::single_request(backend, &base, &content_type, props),
        None => sb::batch_request(backend, &base),
    };
    // The outgoing gate, before a token is fetched: nothing from the caller that HTTP cannot
    // carry unchanged goes further.
    crate::backend::check(&request)?;

    let (_, obtained) = backend_token(&backend.identity, backend.audience(), env, ctx, log).await?;

    log.token_ttl_s = Some((obtained.token.expires_at - now()) / 1000.0);
    let judge = async |mut response: Response| {
        let status = response.status_code();
        log.backend_status = Some(status);
        let retry_after = http::retry_after(&response);
        let text = response.text().await.unwrap_or_default();
        match sb::map_response(status, retry_after, &text, backend.entity()) {
            sb::SendOutcome::Accepted => http::Verdict::Done(()),
            sb::SendOutcome::Retry { retry_after_secs } => http::Verdict::Retry(retry_after_secs),
            sb::SendOutcome::Failed {
                problem,
                evict,
                detail,
            } => {
                log.backend_detail = Some(detail);
                if evict {
                    tokens::evict(&obtained.key, &obtained.token.access_token);
                }
                http::Verdict::Fail(problem)
            }
        }
    };
    // The same bytes and MessageId go out on every attempt, so a send that did arrive before
    // a timeout is dropped as a duplicate by an entity with duplicate detection.
    http::send_retried(
        &request,
        &obtained.token.access_token,
        &payload,
        BACKEND_TIMEOUT_MS,
        judge,
        |why, retry_after| sb::unavailable(retry_after, why),
    )
    .await?;
    let mut accepted = Response::ok(sb::accepted_body(backend.entity(), &ids, backend.batch))
        .map_err(internal)?
        .with_status(202);
    accepted
        .headers_mut()
        .set("content-type", "application/json")
        .map_err(internal)?;
    Ok(accepted)
}

/// The whole body, refused with 413 as soon as it passes `limit` bytes (a body without
/// `Content-Length` is never read further than that).
async fn read_capped(req: &Request, limit: usize) -> std::result::Result<Vec<u8>, Problem> {
    let mut body = Vec::new();
    let Some(mut reader) = body::BodyReader::new(req) else {
        return Ok(body);
    };
    while let Some(chunk) = reader.next().await.map_err(unreadable)? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(sb::too_large(body.len(), limit));
        }
    }
    Ok(body)
}
