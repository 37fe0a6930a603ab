//! `policy`: check and explain a gateway policy before it is deployed.
//!
//! ```text
//! policy check   [FILE]   every error with its JSON path; exit 1 if any, 0 if valid
//! policy explain [FILE]   a table of the routes: what each accepts and where it writes
//! policy schema           the JSON Schema generated from the model (policy.schema.json)
//! ```
//! FILE defaults to `policy.json`.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    std::process::exit(cli::run(std::env::args().skip(1).collect()));
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use azure_edge_gateway::backend::service_bus::{event_property_names, sender_property_names};
    use azure_edge_gateway::policy::{self, Backend, Inbound, Policy, Route};

    const USAGE: &str = "usage: policy check [FILE] | policy explain [FILE] | policy schema\n\
        FILE defaults to policy.json";

    pub fn run(args: Vec<String>) -> i32 {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["check", rest @ ..] if rest.len() <= 1 => {
                check(rest.first().copied().unwrap_or("policy.json"))
            }
            ["explain", rest @ ..] if rest.len() <= 1 => {
                explain(rest.first().copied().unwrap_or("policy.json"))
            }
            ["schema"] => {
                print!("{}", policy::schema::policy_schema_json());
                0
            }
            ["-h" | "--help" | "help"] => {
                println!("{USAGE}");
                0
            }
            _ => {
                eprintln!("{USAGE}");
                2
            }
        }
    }

    fn load(file: &str) -> Result<Policy, i32> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            eprintln!("policy: cannot read {file}: {e}");
            2
        })?;
        policy::load(&text).map_err(|errors| {
            print!("{}", policy::report(file, &errors));
            1
        })
    }

    fn check(file: &str) -> i32 {
        match load(file) {
            Ok(p) => {
                println!(
                    "{file}: valid ({} route(s), {} identit{})",
                    p.routes.len(),
                    p.identities.len(),
                    if p.identities.len() == 1 { "y" } else { "ies" }
                );
                for line in store_notes(&p) {
                    println!("{file}: note: {line}");
                }
                for line in store_warnings(&p) {
                    println!("{file}: warning: {line}");
                }
                0
            }
            Err(code) => code,
        }
    }

    fn explain(file: &str) -> i32 {
        let p = match load(file) {
            Ok(p) => p,
            Err(code) => return code,
        };
        let header = [
            "ROUTE", "METHODS", "PATH", "BACKEND", "TARGET", "IDENTITY", "AUDIENCE", "INBOUND",
        ];
        let rows: Vec<[String; 8]> = p.routes.iter().map(|r| row(&p, r)).collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let print_row = |cells: &[String]| {
            let line: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("{}", line.join("  ").trim_end());
        };
        print_row(&header.map(String::from));
        for r in &rows {
            print_row(r);
        }
        let messages: Vec<String> = p
            .routes
            .iter()
            .filter_map(|r| message_line(&p, r))
            .collect();
        if !messages.is_empty() {
            println!();
            println!("Event Hubs and Storage queue routes: what the caller sends, where it goes, what it gets back");
            for line in messages {
                println!("  {line}");
            }
        }
        let rest: Vec<String> = p.routes.iter().filter_map(|r| rest_lines(&p, r)).collect();
        if !rest.is_empty() {
            println!();
            println!(
                "azure_rest routes: the exact call, what the caller may set, what it gets back"
            );
            for block in rest {
                println!("{block}");
            }
        }
        let valet: Vec<String> = p.routes.iter().filter_map(|r| valet_lines(&p, r)).collect();
        if !valet.is_empty() {
            println!();
            println!(
                "Valet-key routes (blob_sas): what the holder of a URL they answer with can do"
            );
            for block in valet {
                println!("{block}");
            }
        }
        let stored: Vec<&Route> = p
            .routes
            .iter()
            .filter(|r| r.when_unavailable == azure_edge_gateway::policy::WhenUnavailable::Queue)
            .collect();
        if !stored.is_empty() {
            println!();
            println!(
                "Store-and-forward (queue binding {}): when Azure stays unavailable, these routes answer 202 queued and deliver later",
                p.store_binding()
            );
            for r in stored {
                let which = match r.backend {
                    Backend::Blob(_) => "bodies of known length",
                    _ => "messages (or batches)",
                };
                println!(
                    "  {}: {which} up to {} bytes are stored; larger ones get 503 as without it",
                    r.name,
                    azure_edge_gateway::store::MAX_STORED_BODY_BYTES
                );
            }
        }
        let compiled = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                azure_edge_gateway::policy::compile(&text).map_err(|e| format!("{e:?}"))
            });
        match compiled {
            Ok(prepared) => {
                println!();
                for line in breaker_lines(&p, &prepared) {
                    println!("{line}");
                }
            }
            Err(e) => {
                eprintln!("policy: {file} could not be compiled: {e}");
                return 1;
            }
        }
        let batches: Vec<String> = p.routes.iter().filter_map(batch_line).collect();
        if !batches.is_empty() {
            println!();
            println!("Batch routes: what each element of the caller's array may set");
            for line in batches {
                println!("  {line}");
            }
        }
        println!();
        println!("After a timeout, a lost connection or a 500 (Azure may have carried it out):");
        for r in &p.routes {
            if let Some(line) = resend_line(r) {
                println!("  {}: {line}", r.name);
            }
        }
        let coalescing: Vec<String> = p.routes.iter().filter_map(coalesce_line).collect();
        if !coalescing.is_empty() {
            println!();
            println!("Coalescing (group commit): sends that arrive while one to the same entity is in flight leave as one batch:");
            for line in coalescing {
                println!("  {line}");
            }
        }
        0
    }

    /// Whether a Service Bus or Event Hubs route coalesces its sends, and within what limits.
    fn coalesce_line(r: &Route) -> Option<String> {
        let sb = match &r.backend {
            Backend::ServiceBus(sb) => sb.clone(),
            Backend::EventHubs(eh) => eh.as_service_bus(),
            _ => return None,
        };
        let by = match &r.backend {
            Backend::ServiceBus(_) => "session or partition key",
            _ => "partition key",
        };
        Some(if sb.coalesces() {
            format!(
                "{}: on, at most {} messages and {} bytes per batch, one batch per {by}, linger {} ms; a body that is not UTF-8 goes alone",
                r.name,
                sb.max_batch_messages(),
                sb.max_message_bytes(),
                sb.linger_ms.unwrap_or(0)
            )
        } else if sb.batch {
            format!(
                "{}: off (a batch route sends each caller's batch as it is)",
                r.name
            )
        } else {
            format!(
                "{}: off (\"coalesce\": false): every request is its own send",
                r.name
            )
        })
    }

    /// Whether a route's request is sent again when its outcome is unknown, and why.
    fn resend_line(r: &Route) -> Option<&'static str> {
        const NOT: &str = "not sent again: the caller gets backend-outcome-unknown (502/504)";
        const READ: &str = "a read: sent again";
        use azure_edge_gateway::backend::azure_rest::idempotent;
        let reads = r
            .methods
            .iter()
            .all(|m| matches!(m.as_str(), "GET" | "HEAD"));
        Some(match &r.backend {
            Backend::Blob(_) if reads => READ,
            Backend::ServiceBus(sb) if sb.duplicate_detection => {
                "sent again, same MessageId (the entity's duplicate detection drops a second copy)"
            }
            Backend::ServiceBus(_) => {
                "not sent again (no duplicate_detection declared): the caller gets backend-outcome-unknown (502/504)"
            }
            Backend::EventHubs(_) | Backend::StorageQueue(_) => NOT,
            Backend::Blob(_) => {
                "a held body is sent again (PUT); a create-only name then found taken is backend-outcome-unknown; a streamed body is never sent twice"
            }
            Backend::AzureRest(rest) => {
                let sent: Vec<&str> = match rest.method {
                    Some(m) => vec![m.as_str()],
                    None => r.methods.iter().map(|m| m.as_str()).collect(),
                };
                if sent.iter().all(|m| idempotent(m)) {
                    "sent again (an idempotent method with a held body; a streamed body never)"
                } else if sent.iter().any(|m| idempotent(m)) {
                    "as the caller's method: GET, HEAD, PUT, DELETE sent again; POST, PATCH not (backend-outcome-unknown)"
                } else {
                    NOT
                }
            }
            _ => return None,
        })
    }

    /// Each route's circuit breakers: whom each refuses, and what opens it (from the same rules
    /// the gateway runs, [`azure_edge_gateway::breaker`]).
    fn breaker_lines(
        p: &Policy,
        prepared: &azure_edge_gateway::policy::prepared::Prepared,
    ) -> Vec<String> {
        use azure_edge_gateway::breaker::{Rule, Scope};
        use azure_edge_gateway::retry::RETRY_AFTER_SECS;
        let cell = |rule: Option<Rule>| match rule {
            None => "-".to_owned(),
            Some(rule) => {
                let mut cell = rule.failures.to_string();
                if let Some(n) = rule.per_caller {
                    cell.push_str(&format!(" c<={n}"));
                }
                if let Some(n) = rule.per_resource {
                    cell.push_str(&format!(" r<={n}"));
                }
                cell
            }
        };
        let mut out = vec![
            "Circuit breakers (per isolate): whom each refuses, on whose failures".to_owned(),
            "  A breaker refuses one scope and opens on failures from inside it: CALLER_RESOURCE one caller on one resource, CALLER one caller on the route, RESOURCE every caller on one resource, ROUTE every caller on the route, HOST every route on the origin.".to_owned(),
            "  Each cell: the failures (within the window) that open it; c<=N, r<=N: at most N of them from one caller, on one resource; '-': the route has one resource, so CALLER is CALLER_RESOURCE and RESOURCE is ROUTE.".to_owned(),
            "  Callers are told apart by their API key's name, else their token's issuer and subject, else their address (IPv6 by its /64); a resource is the path of the URL sent to Azure.".to_owned(),
            format!("  An open breaker refuses for its route's cool-down, or for Azure's Retry-After ({}-{} s) when every failure that opened it carried one; then one probe per caller at a time.", RETRY_AFTER_SECS.start(), RETRY_AFTER_SECS.end()),
        ];
        let mut hosts: Vec<(&str, Vec<&str>, Option<Rule>)> = Vec::new();
        for r in prepared.routes.iter().filter(|r| r.breaker.failures > 0) {
            match hosts.iter_mut().find(|(h, _, _)| *h == r.host) {
                Some((_, names, _)) => names.push(&r.name),
                None => hosts.push((&r.host, vec![&r.name], r.breaker.rule(Scope::Host))),
            }
        }
        for (host, names, rule) in &hosts {
            out.push(format!(
                "  HOST {host} ({}): {} within {} s",
                names.join(", "),
                cell(*rule),
                rule.map_or(0.0, |r| r.window_ms / 1000.0)
            ));
        }
        let header = [
            "ROUTE",
            "CALLERS BY",
            "RESOURCES",
            "WINDOW",
            "COOL-DOWN",
            "CALLER_RESOURCE",
            "CALLER",
            "RESOURCE",
            "ROUTE",
            "HOST",
        ]
        .map(String::from);
        let mut rows = vec![header];
        let mut off = Vec::new();
        for (route, prepared) in p.routes.iter().zip(&prepared.routes) {
            let config = &prepared.breaker;
            if config.failures == 0 {
                off.push(format!(
                    "  {}: no breaker (\"failures\": 0): always called, its failures count nowhere",
                    route.name
                ));
                continue;
            }
            let inbound = p.effective_inbound(route);
            let callers = if inbound.api_key.is_some() {
                "API key"
            } else if inbound.jwt.is_some() {
                "token subject"
            } else {
                "address"
            };
            rows.push([
                route.name.clone(),
                callers.to_owned(),
                if config.many_resources { "many" } else { "one" }.to_owned(),
                format!("{} s", config.window_ms / 1000.0),
                format!("{} s", config.cooldown_ms / 1000.0),
                cell(config.rule(Scope::CallerResource)),
                cell(config.rule(Scope::Caller)),
                cell(config.rule(Scope::Resource)),
                cell(config.rule(Scope::Route)),
                prepared.host.clone(),
            ]);
        }
        let widths: Vec<usize> = (0..10)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push(format!("  {}", cells.join("  ").trim_end()));
        }
        out.extend(off);
        out
    }

    /// Store-and-forward routes that accept requests larger than a queue message can carry:
    /// those are not stored when Azure is unavailable (they get 503, as without it).
    fn store_notes(p: &Policy) -> Vec<String> {
        use azure_edge_gateway::policy::WhenUnavailable;
        use azure_edge_gateway::store::MAX_STORED_BODY_BYTES;
        let max = MAX_STORED_BODY_BYTES as u64;
        p.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.when_unavailable == WhenUnavailable::Queue)
            .filter_map(|(i, r)| {
                let backend_limit = match &r.backend {
                    Backend::ServiceBus(sb) => sb.max_message_bytes() as u64,
                    Backend::Blob(b) => b.max_body_bytes(),
                    _ => return None,
                };
                let limit = p
                    .effective_inbound(r)
                    .max_body_bytes
                    .map_or(backend_limit, |m| m.min(backend_limit));
                (limit > max).then(|| {
                    format!(
                        "routes[{i}] (\"{}\") accepts bodies up to {limit} bytes, but only those up to {max} bytes (of known length, for a blob) are stored when Azure is unavailable; larger ones get 503 with Retry-After, as without store-and-forward",
                        r.name
                    )
                })
            })
            .collect()
    }

    /// Store-and-forward routes without a rate limit: while Azure is unavailable (the breaker
    /// open, nothing sent), each request a caller makes costs it one request and puts a message
    /// of up to the stored size on the queue, so one caller could fill the queue.
    fn store_warnings(p: &Policy) -> Vec<String> {
        use azure_edge_gateway::policy::WhenUnavailable;
        use azure_edge_gateway::store::MAX_STORED_BODY_BYTES;
        p.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.when_unavailable == WhenUnavailable::Queue)
            .filter(|(_, r)| p.effective_inbound(r).rate_limit.is_none())
            .map(|(i, r)| {
                format!(
                    "routes[{i}] (\"{}\") stores requests when Azure is unavailable but has no rate limit: with the breaker open each request puts a message of up to {MAX_STORED_BODY_BYTES} bytes on the store-and-forward queue without reaching Azure, so one caller can fill the queue; add inbound.rate_limit",
                    r.name
                )
            })
            .collect()
    }

    /// What a valet-key URL allows, what a SAS cannot limit, and how to take URLs back. Never
    /// a URL or a signature: explain mints nothing.
    fn valet_lines(p: &Policy, r: &Route) -> Option<String> {
        use azure_edge_gateway::policy::SasPermission;
        let Backend::BlobSas(b) = &r.backend else {
            return None;
        };
        let blob = format!("{}/{}", b.container, b.blob);
        let what = match b.permission {
            SasPermission::Create => format!(
                "create the blob {blob} once, in one Put Blob of up to 5000 MiB (Azure's single Put Blob limit); it cannot overwrite a blob that exists, read, or write another name. Azure allows Put Block and Put Block List under \"c\" only from service version 2026-04-06, newer than the one these URLs are signed for (2025-11-05, the newest Azurite verifies), so a file over 5000 MiB needs \"create_write\""
            ),
            SasPermission::CreateWrite => format!(
                "create or overwrite the blob {blob}, as often as it likes until the URL expires, in one Put Blob (up to 5000 MiB) or in blocks (Put Block, Put Block List); it cannot read or write another name"
            ),
            SasPermission::Read => {
                let mut served = String::new();
                if let Some(cd) = &b.response_content_disposition {
                    served.push_str(&format!(", served with Content-Disposition {cd}"));
                }
                if let Some(ct) = &b.response_content_type {
                    served.push_str(&format!(", served with Content-Type {ct}"));
                }
                format!("read the blob {blob} (Get Blob, Get Blob Properties) as often as it likes until the URL expires{served}; it cannot write, or read another name")
            }
        };
        let mut lines = vec![format!(
            "  {}: a URL valid {} s lets whoever holds it (it is a bearer credential) {what}.",
            r.name,
            b.lifetime_seconds()
        )];
        lines.push(if b.client_ip {
            "    It is limited to the caller's IPv4 address (the SAS's sip; Azurite does not check it).".to_owned()
        } else {
            "    It works from any address (\"client_ip\": true limits it to the caller's).".to_owned()
        });
        if b.permission != SasPermission::Read {
            lines.push("    A SAS cannot limit the size, the content or the content type of what is uploaded (up to Azure's limits). To bound them: a lifecycle management rule that deletes blobs under this container or prefix after some days, or an Event Grid subscription to BlobCreated that checks each new blob and deletes what is too large or not allowed.".to_owned());
        }
        lines.push(format!(
            "    A URL cannot be taken back alone: revoking the account's user delegation keys (az storage account revoke-delegation-keys) voids every URL signed with them; the gateway keeps signing with its cached key until it refreshes it (within about an hour) or is deployed again. Identity {} needs Storage Blob Delegator (or a Storage Blob Data role) on {} and a data role that allows this on the container.",
            b.identity,
            b.base_url(p.cloud)
        ));
        Some(lines.join("\n"))
    }

    /// For an `azure_rest` route: the URL's shape with the pinned version, the audience, what
    /// the caller's request may put into it, and what comes back.
    fn rest_lines(p: &Policy, r: &Route) -> Option<String> {
        use azure_edge_gateway::backend::azure_rest::{url::RestUrl, DEFAULT_RESPONSE_HEADERS};
        use azure_edge_gateway::policy::{ErrorMode, RestBody};
        let Backend::AzureRest(rest) = &r.backend else {
            return None;
        };
        let url = RestUrl::parse(&rest.url).ok()?;
        let service = rest.service(p.cloud)?;
        let version = match (&rest.api_version, service.versioning) {
            (Some(v), azure_edge_gateway::policy::cloud::Versioning::Header) => {
                format!(" (x-ms-version: {v})")
            }
            (Some(v), _) => format!(
                "{}api-version={v}",
                if url.query.is_empty() { "?" } else { "&" }
            ),
            (None, _) => String::new(),
        };
        let method = rest
            .method
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| "the caller's method".to_owned());
        let mut out = vec![format!("  {}: {method} {}{version}", r.name, url.shape())];
        out.push(format!(
            "    token: {} for {} ({})",
            rest.identity,
            rest.audience(p.cloud),
            service.name
        ));
        let vars: Vec<String> = url.vars().map(|v| v.to_string()).collect();
        let mut may = Vec::new();
        if !vars.is_empty() {
            may.push(format!(
                "{} (each one whole segment or query value, percent-encoded; '/', '\\', '.' and '..' refused in segments)",
                vars.join(", ")
            ));
        }
        if !rest.query.is_empty() {
            may.push(format!("query {}", rest.query.join(", ")));
        }
        if !rest.request_headers.is_empty() {
            may.push(format!("headers {}", rest.request_headers.join(", ")));
        }
        may.push(match &rest.body {
            None | Some(RestBody::Caller) => format!(
                "a body of at most {} bytes, with its Content-Type",
                rest.max_body_bytes
                    .unwrap_or(azure_edge_gateway::backend::azure_rest::DEFAULT_MAX_BODY_BYTES)
            ),
            Some(RestBody::Stream) => {
                "a body streamed through (Content-Length required)".to_owned()
            }
            Some(RestBody::None) => "no body (none is sent)".to_owned(),
            Some(RestBody::Json(_)) => format!(
                "only the values of the JSON body template (at most {} bytes built)",
                built_limit(rest)
            ),
            Some(RestBody::Template { content_type, .. }) => format!(
                "only the values of the {content_type} body template (at most {} bytes built)",
                built_limit(rest)
            ),
        });
        out.push(format!("    caller sets: {}", may.join("; ")));
        let mut back: Vec<String> = DEFAULT_RESPONSE_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect();
        if rest.errors == ErrorMode::Pass {
            back.push("x-ms-error-code".to_owned());
        }
        back.extend(rest.response_headers.iter().map(|h| h.to_ascii_lowercase()));
        let read_limit = rest
            .max_answer_bytes
            .unwrap_or(azure_edge_gateway::backend::azure_rest::DEFAULT_MAX_ANSWER_BYTES);
        let mut kept = Vec::new();
        if !rest.project.is_empty() {
            kept.push(rest.project.join(", "));
        }
        if !rest.project_items.is_empty() {
            kept.push(format!(
                "{} of each element of /value",
                rest.project_items.join(", ")
            ));
        }
        let body = if rest.response_body == azure_edge_gateway::policy::ResponseBody::None {
            "no body (Azure's is never passed on)".to_owned()
        } else if kept.is_empty() {
            "Azure's body".to_owned()
        } else {
            format!(
                "only {} of Azure's JSON (read up to {read_limit} bytes, 502 past them)",
                kept.join("; ")
            )
        };
        let errors = match rest.errors {
            ErrorMode::Problem => "errors as problem+json naming Azure's code",
            ErrorMode::Pass => "errors passed through",
        };
        out.push(format!(
            "    caller gets: Azure's status, {body}, headers {}; {errors}",
            back.join(", ")
        ));
        if rest.pages {
            out.push(format!(
                "    pages: Azure's nextLink / @odata.nextLink / <NextMarker> becomes {}?{}=<handle> (also Link: rel=\"next\"), sealed, for this route and path, valid {} min; never Azure's URL. Each page is read whole (up to {read_limit} bytes)",
                r.path,
                azure_edge_gateway::backend::azure_rest::PAGE_PARAMETER,
                azure_edge_gateway::backend::azure_rest::PAGE_HANDLE_TTL_S / 60.0
            ));
        }
        if let Some(warning) = rest.secret_warning(p.cloud) {
            out.push(format!(
                "    WARNING: passes Azure's answers whole, and {warning}"
            ));
        }
        if let Some(follower) = p
            .routes
            .iter()
            .find(|o| matches!(&o.backend, Backend::AzureOperation(op) if op.of.contains(&r.name)))
        {
            let shown = match &follower.backend {
                Backend::AzureOperation(op) => op.project.clone().unwrap_or_else(|| {
                    azure_edge_gateway::backend::azure_rest::OPERATION_FIELDS
                        .iter()
                        .map(|f| (*f).to_owned())
                        .collect()
                }),
                _ => Vec::new(),
            };
            out.push(format!(
                "    long-running: a 202 is answered with Location: {} (route {}), never Azure's URL; following it shows only {} of the operation's answer",
                follower.path,
                follower.name,
                shown.join(", ")
            ));
        }
        Some(out.join("\n"))
    }

    /// The most a route's body template builds.
    fn built_limit(rest: &azure_edge_gateway::policy::AzureRestBackend) -> u64 {
        use azure_edge_gateway::backend::azure_rest::{
            default_max_built_body_bytes, DEFAULT_MAX_BODY_BYTES,
        };
        rest.max_built_body_bytes.unwrap_or_else(|| {
            default_max_built_body_bytes(rest.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES))
        })
    }

    /// For a batch route: the `BrokerProperties` an element may set (a sender's, less those the
    /// route maps; for an event hub, less Service Bus's own) and the `UserProperties` names the
    /// route keeps for itself.
    fn batch_line(r: &Route) -> Option<String> {
        let (mapping, names): (_, Vec<&str>) = match &r.backend {
            Backend::ServiceBus(sb) if sb.batch => {
                (sb.message.clone(), sender_property_names().collect())
            }
            Backend::EventHubs(eh) if eh.batch => {
                (Some(eh.mapping()), event_property_names().collect())
            }
            _ => return None,
        };
        let mapped = mapping
            .as_ref()
            .map(|m| m.mapped_broker_properties())
            .unwrap_or_default();
        let settable: Vec<&str> = names.into_iter().filter(|n| !mapped.contains(n)).collect();
        let broker = match (settable.is_empty(), mapped.is_empty()) {
            (true, _) => "no BrokerProperties".to_owned(),
            (false, true) => format!("BrokerProperties {}", settable.join(", ")),
            (false, false) => format!(
                "BrokerProperties {} (not {}: the route sets {})",
                settable.join(", "),
                mapped.join(", "),
                if mapped.len() == 1 { "it" } else { "them" }
            ),
        };
        let reserved: Vec<&str> = mapping
            .iter()
            .flat_map(|m| m.properties.keys().map(String::as_str))
            .collect();
        let user = if reserved.is_empty() {
            "UserProperties of any name".to_owned()
        } else {
            format!(
                "UserProperties of any name but {} (the route sets {}; names compare case-insensitively)",
                reserved.join(", "),
                if reserved.len() == 1 { "it" } else { "them" }
            )
        };
        Some(format!("{}: {broker}; {user}", r.name))
    }

    /// For an event hub or Storage queue route: what the caller sends, the exact request the
    /// gateway makes of it, the audience, and the answer.
    fn message_line(p: &Policy, r: &Route) -> Option<String> {
        match &r.backend {
            Backend::EventHubs(eh) => {
                let sends = if eh.batch {
                    "a JSON array of events [{\"Body\", \"BrokerProperties\", \"UserProperties\"}], sent as one batch"
                } else {
                    "the body is one event (its Content-Type kept)"
                };
                let mut sets = Vec::new();
                if let Some(key) = &eh.partition_key {
                    sets.push(format!("PartitionKey {key}"));
                }
                for (name, template) in &eh.properties {
                    sets.push(format!("property {name} = {template}"));
                }
                let sets = if sets.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", sets.join(", "))
                };
                Some(format!(
                    "{}: {sends}, at most {} bytes -> POST {}/{}/messages{sets}; audience {}; answer 202 {{status, hub, count}}",
                    r.name,
                    eh.max_message_bytes(),
                    eh.base_url(p.cloud),
                    eh.hub,
                    eh.audience()
                ))
            }
            Backend::StorageQueue(q) => {
                let visible = match q.visibility_timeout_seconds {
                    Some(s) if s > 0 => format!("hidden for {s} s after it is put"),
                    _ => "visible at once".to_owned(),
                };
                let lives = match q.message_ttl_seconds {
                    Some(-1) => "never expires".to_owned(),
                    Some(s) => format!("lives {s} s"),
                    None => "lives 7 days (Azure's default)".to_owned(),
                };
                Some(format!(
                    "{}: the body (at most {} bytes) is the message, {} -> POST {}; {visible}, {lives}; audience {}; answer 202 {{status, queue, message_id, insertion_time, expiration_time, time_next_visible}}",
                    r.name,
                    q.max_body_bytes(),
                    match q.encoding {
                        policy::QueueEncoding::Base64 => "base64-encoded",
                        policy::QueueEncoding::Text => "as UTF-8 text (XML-escaped)",
                    },
                    q.send_url(p.cloud),
                    q.audience()
                ))
            }
            _ => None,
        }
    }

    /// Every check a route runs, in the order it runs them.
    fn describe_inbound(i: &Inbound, public: bool) -> String {
        let mut checks = Vec::new();
        if let Some(ip) = &i.ip {
            checks.push(format!(
                "ip(allow {}, deny {})",
                ip.allow.len(),
                ip.deny.len()
            ));
        }
        if let Some(max) = i.max_body_bytes {
            checks.push(format!("max {max} B"));
        }
        if !i.content_types.is_empty() {
            checks.push(format!("types({})", i.content_types.join(",")));
        }
        for h in &i.required_headers {
            checks.push(format!("header {}", h.name));
        }
        if let Some(k) = &i.api_key {
            let names: Vec<&str> = k.keys.iter().map(|k| k.name.as_str()).collect();
            checks.push(format!("api_key {}({})", k.header, names.join(",")));
        }
        if let Some(j) = &i.jwt {
            let roles: Vec<String> = j
                .required_claims
                .iter()
                .map(|(c, v)| format!("{c}={}", v.join("+")))
                .collect();
            checks.push(format!(
                "jwt(aud {}{})",
                j.audiences.join(","),
                if roles.is_empty() {
                    String::new()
                } else {
                    format!("; {}", roles.join(";"))
                }
            ));
        }
        if let Some(r) = &i.rate_limit {
            checks.push(format!(
                "rate {}/{}s by {:?}",
                r.limit, r.period_seconds, r.key
            ));
        }
        if let Some(c) = &i.cors {
            checks.push(format!("cors({})", c.origins.join(",")));
        }
        match (checks.is_empty(), public) {
            (true, _) => "PUBLIC: none".to_owned(),
            (false, true) => format!("PUBLIC: {}", checks.join("; ")),
            (false, false) => checks.join("; "),
        }
    }

    fn row(p: &Policy, r: &Route) -> [String; 8] {
        let methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
        let target = r.backend.target(p.cloud);
        let local = p
            .local_endpoints
            .iter()
            .any(|l| target.starts_with(l.trim_end_matches('/')));
        let inbound = describe_inbound(&p.effective_inbound(r), r.public);
        [
            r.name.clone(),
            methods.join(","),
            r.path.clone(),
            r.backend.kind().to_owned(),
            if local {
                format!("{target} (local)")
            } else {
                target
            },
            match &r.backend {
                Backend::AzureOperation(_) => "(its routes')".to_owned(),
                b => b.identity().to_owned(),
            },
            match &r.backend {
                Backend::AzureOperation(_) => "(its routes')".to_owned(),
                b => b.audience(p.cloud),
            },
            inbound,
        ]
    }
}
