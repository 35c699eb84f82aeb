//! Who may talk to the host, as far as the host itself can tell: which clients may open
//! ext_proc streams (a certificate identity, on top of mutual TLS), and which may change its
//! state through the admin listener (a bearer token, or a local connection). Network policies
//! in deploy/ say the rest.
//!
//! Every refusal is logged and counted (`wasm_extproc_refused_total{listener, reason}`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::read_admin_token;
use crate::metrics::Metrics;

/// The ext_proc listener's allow-list of client identities (`[tls] allowed_client_sans`).
#[derive(Debug, Clone, Default)]
pub struct ClientIdentities {
    allowed: Arc<[String]>,
}

impl ClientIdentities {
    /// Admits certificates with one of `allowed` as a subject alternative name; an empty list
    /// admits every client TLS admitted.
    pub fn new(allowed: &[String]) -> Self {
        ClientIdentities {
            allowed: allowed.into(),
        }
    }

    /// Whether the client of `request` may open a stream; `PERMISSION_DENIED` naming what it
    /// presented if not.
    pub fn admit<T>(
        &self,
        request: &tonic::Request<T>,
        metrics: &Metrics,
    ) -> Result<(), tonic::Status> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let certificates = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .or_else(|| {
                request
                    .extensions()
                    .get::<TlsConnectInfo<UdsConnectInfo>>()
                    .and_then(TlsConnectInfo::peer_certs)
            });
        let names = match certificates.as_deref().and_then(|c| c.first()) {
            Some(leaf) => subject_alternative_names(leaf),
            None => Vec::new(),
        };
        if names.iter().any(|name| self.allowed.contains(name)) {
            return Ok(());
        }
        metrics.refused("ext_proc", "identity");
        let peer = request
            .remote_addr()
            .map_or_else(|| "a local socket".to_string(), |a| a.to_string());
        tracing::warn!(
            %peer,
            presented = ?names,
            "ext_proc stream refused: the client certificate names none of [tls] \
             allowed_client_sans"
        );
        Err(tonic::Status::permission_denied(format!(
            "client identity {names:?} is not in this server's allowed_client_sans"
        )))
    }
}

/// The DNS names and URIs (SPIFFE IDs) a DER certificate names as subject alternatives.
fn subject_alternative_names(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(extension)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// Who may use the admin listener's state-changing endpoints (`POST /reload`).
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    /// The bearer token's file (`admin_token_file`), read on each request so a rotated
    /// Secret takes effect at once; `None`: local connections only.
    pub token_file: Option<PathBuf>,
}

/// Why a state-changing admin request was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A token is required and the request had none, or another one: 401.
    Unauthorized(&'static str),
    /// No token is configured and the client is not local: 403.
    NotLocal,
    /// The token file cannot be read now: 503, and the operator is told why.
    TokenUnavailable(String),
}

impl Refusal {
    /// The label the refusal is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthorized(reason) => reason,
            Refusal::NotLocal => "not_local",
            Refusal::TokenUnavailable(_) => "token_unavailable",
        }
    }
}

impl AdminAccess {
    /// Whether a state-changing request from `peer` with `authorization` (the header's value)
    /// may proceed. With a token configured, it must carry it (`Bearer <token>`), wherever it
    /// comes from; without one, it must come from 127.0.0.1 or ::1 -- `kubectl port-forward`
    /// and `kubectl exec` do. Not the rest of 127.0.0.0/8: Istio's sidecar hands inbound
    /// traffic to the application from 127.0.0.6, so any pod in the mesh would look local.
    pub fn admit(&self, peer: SocketAddr, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let Some(file) = &self.token_file else {
            return if is_local(peer.ip()) {
                Ok(())
            } else {
                Err(Refusal::NotLocal)
            };
        };
        let token = read_admin_token(file).map_err(Refusal::TokenUnavailable)?;
        let presented = authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .ok_or(Refusal::Unauthorized("missing_token"))?;
        if bool::from(presented.trim_ascii().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized("wrong_token"))
        }
    }
}

fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_a_token_only_loopback_itself_may_change_state() {
        let access = AdminAccess::default();
        assert_eq!(access.admit(peer("127.0.0.1:5000"), None), Ok(()));
        assert_eq!(access.admit(peer("[::1]:5000"), None), Ok(()));
        assert_eq!(access.admit(peer("[::ffff:127.0.0.1]:5000"), None), Ok(()));
        // Istio's sidecar delivers every inbound connection from 127.0.0.6.
        assert_eq!(
            access.admit(peer("127.0.0.6:5000"), None),
            Err(Refusal::NotLocal)
        );
        assert_eq!(
            access.admit(peer("10.0.0.7:5000"), Some(b"Bearer anything")),
            Err(Refusal::NotLocal)
        );
    }

    #[test]
    fn with_a_token_every_client_must_present_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let access = AdminAccess {
            token_file: Some(file.clone()),
        };
        assert_eq!(
            access.admit(peer("10.0.0.7:5000"), Some(b"Bearer s3cret")),
            Ok(())
        );
        assert_eq!(
            access.admit(peer("127.0.0.1:5000"), None),
            Err(Refusal::Unauthorized("missing_token"))
        );
        assert_eq!(
            access.admit(peer("127.0.0.1:5000"), Some(b"s3cret")),
            Err(Refusal::Unauthorized("missing_token"))
        );
        assert_eq!(
            access.admit(peer("127.0.0.1:5000"), Some(b"Bearer s3cre")),
            Err(Refusal::Unauthorized("wrong_token"))
        );
        // Rotated: the new token counts at once, the old one no longer.
        std::fs::write(&file, "n3w\n").unwrap();
        assert_eq!(
            access.admit(peer("10.0.0.7:5000"), Some(b"Bearer s3cret")),
            Err(Refusal::Unauthorized("wrong_token"))
        );
        assert_eq!(
            access.admit(peer("10.0.0.7:5000"), Some(b"Bearer n3w")),
            Ok(())
        );
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            access.admit(peer("127.0.0.1:5000"), Some(b"Bearer n3w")),
            Err(Refusal::TokenUnavailable(_))
        ));
    }

    #[test]
    fn subject_alternative_names_are_read_from_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["envoy.example".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/default/sa/httpbin"
                .try_into()
                .unwrap(),
        ));
        let certificate = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_alternative_names(certificate.der()),
            [
                "envoy.example",
                "spiffe://cluster.local/ns/default/sa/httpbin"
            ]
        );
        assert!(subject_alternative_names(b"not a certificate").is_empty());
    }
}
