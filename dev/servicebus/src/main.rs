//! Binary entry point; see the library's documentation for the command line and the contract.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use servicebus_standin::config::parse_args;
use servicebus_standin::server::{serve, App};
use servicebus_standin::store::Broker;

fn log(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servicebus-standin: {e}");
            std::process::exit(2);
        }
    };
    let server = match tiny_http::Server::http(("127.0.0.1", config.port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "servicebus-standin: cannot listen on 127.0.0.1:{}: {e}",
                config.port
            );
            std::process::exit(1);
        }
    };
    let port = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .unwrap_or(config.port);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("servicebus-standin: cannot handle signal {signal}: {e}");
            std::process::exit(1);
        }
    }
    let entities: Vec<String> = config
        .entities
        .iter()
        .map(|e| match (e.partitions, e.duplicate_detection) {
            (Some(n), _) => format!(
                "{} (event hub, {n} partitions, max {} B)",
                e.name, e.max_size
            ),
            (None, Some(w)) => format!(
                "{} (duplicate detection {} s, max {} B)",
                e.name,
                w.as_secs(),
                e.max_size
            ),
            (None, None) => format!("{} (max {} B)", e.name, e.max_size),
        })
        .collect();
    let app = Arc::new(App::new(
        Broker::new(config.entities),
        port,
        &config.jwks_url,
        &config.issuer_prefix,
    ));
    log(&format!(
        "entities: {}; JWKS {}",
        entities.join(", "),
        config.jwks_url
    ));
    log(&format!(
        "servicebus-standin listening on http://127.0.0.1:{port}"
    ));

    while !stop.load(Ordering::Relaxed) {
        match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(request)) => {
                let app = Arc::clone(&app);
                std::thread::spawn(move || serve(&app, request, &log));
            }
            Ok(None) => {}
            Err(e) => log(&format!("accept failed: {e}")),
        }
    }
    log("servicebus-standin stopping (signal received)");
}
