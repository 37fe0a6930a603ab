//! Backends: how an accepted request becomes an Azure REST call, and how Azure's answer
//! becomes the caller's. Each backend builds its request as data and maps the response; the
//! edge sends.

pub mod blob;
pub mod service_bus;

/// An HTTP request to a backend, without its body (the edge streams that).
#[derive(Clone, PartialEq, Eq)]
pub struct BackendRequest {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

// Carries a bearer token: never print the headers.
impl std::fmt::Debug for BackendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl BackendRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
