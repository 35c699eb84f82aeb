//! The same plugin files, the same settings, the same requests, both modes: behind Envoy's
//! ext_proc filter with the host as its server, and in Envoy's process through the dynamic
//! module. Each case runs in both and expects exactly the same from the outside: what the
//! client gets, what the upstream gets, what plugins' failures cost.
//!
//! Over ext_proc, bodies flow `FULL_DUPLEX_STREAMED` (the mode in-process bodies follow).

use extproc_testkit::deployment::{Case, Deployment, Mode};
use extproc_testkit::echo::generated;
use extproc_testkit::envoy::{HTTP_FILTERS, HttpRequest, HttpResponse, lua_filter};
use extproc_testkit::fixtures::{
    ASM_DEMO, ASM_V2, BEARER_AUTH, CONTEXT_PROBE, CONTRACT_0_2, Component, GATE, JSON_REDACT,
    KV_PROBE, MEMORY_HOG, MISBEHAVE, RATE_LIMIT, RECURSE, SHOUT, SLOW, SPIN, TAGGER, TRAP,
};

use std::time::{Duration, Instant};

use extproc_testkit::fixtures::TOKEN_INTROSPECT;
use extproc_testkit::redis::Redis;
use extproc_testkit::series::CapabilitySeries as _;
use extproc_testkit::service::Service;

use super::bodies::{assert_length_fits, assert_same, in_chunks, redacted};
use super::operations::replace_file;
use super::outbound::{introspection, with_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_headers_both_ways() {
    let case = Case::new(&[("asm", ASM_DEMO)], "");
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let response = d.envoy.get("/headers").await.unwrap();
        response.assert_tagged_by_asm(&format!("{mode:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_responses_from_headers_and_bodies() {
    let case = Case::new(
        &[("10-auth", BEARER_AUTH), ("20-asm", ASM_DEMO)],
        "[plugins.10-auth]\nconfig = \"realm=api;tokens=s3cret\"\n",
    );
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let denied = d.envoy.get("/headers").await.unwrap();
        assert_eq!(denied.status, 401, "{mode:?}");
        assert_eq!(
            denied.header_values("www-authenticate"),
            ["Bearer realm=\"api\""],
            "{mode:?}"
        );
        assert_eq!(denied.body, br#"{"error":"unauthorized"}"#, "{mode:?}");
        assert!(d.upstream.seen().is_empty(), "{mode:?}: upstream touched");
        let allowed = d
            .envoy
            .request(
                "GET",
                "/headers",
                &[("authorization", "Bearer s3cret")],
                Vec::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        assert_eq!(allowed.status, 200, "{mode:?}");
        assert_eq!(
            allowed.header_values("x-ext-proc-header"),
            ["hello-from-asm"],
            "{mode:?}"
        );
    }
    for phase in ["request_headers", "request_body", "response_headers"] {
        let case = Case::new(
            &[("gate", GATE)],
            &format!("[plugins.gate]\nconfig = \"{phase}\"\n"),
        )
        .bodies();
        for mode in Mode::BOTH {
            let d = Deployment::start(mode, &case).await;
            let response = d
                .envoy
                .send(&HttpRequest::new("POST", "/anything").body(b"payload".to_vec()))
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
            assert_eq!(response.status, 403, "{mode:?} {phase}");
            assert_eq!(
                response.header_values("x-gate"),
                [phase],
                "{mode:?} {phase}"
            );
            assert_eq!(
                response.body,
                format!("blocked at {phase}").as_bytes(),
                "{mode:?} {phase}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_replaced_both_ways() {
    let case = Case::new(&[("shout", SHOUT)], "").bodies();
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        for size in [0, 1, 64 * 1024, 1 << 20] {
            let label = format!("{mode:?}, {size} bytes");
            let body = generated(size, false);
            let shouted = body.to_ascii_uppercase();
            let response = d
                .envoy
                .send(&HttpRequest::new("POST", "/anything").body(body.clone()))
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: {e:#}\n{}", d.envoy.log()));
            assert_eq!(response.status, 200, "{label}");
            let seen = d.upstream.seen().last().unwrap().body.clone();
            assert_same(&seen, &shouted, &format!("{label}, at the upstream"));
            // The echo sends the shouted body back; shouting it again changes nothing.
            assert_same(&response.body, &shouted, &format!("{label}, at the client"));
            assert_length_fits(&response, &label);
        }
        let body = generated(100_000, false);
        let response = d
            .envoy
            .send(&HttpRequest::new("POST", "/anything").chunked(in_chunks(&body)))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        assert_same(
            &response.body,
            &body.to_ascii_uppercase(),
            &format!("{mode:?}, chunked upload"),
        );
    }
}

/// A POST of a generated JSON body of `size` bytes, answered 200.
async fn post_json(d: &Deployment, size: usize, label: &str) -> HttpResponse {
    let response = d
        .envoy
        .send(
            &HttpRequest::new("POST", "/anything")
                .header("content-type", "application/json")
                .body(generated(size, true)),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
    assert_eq!(response.status, 200, "{label}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_bodies_are_replaced_both_ways() {
    let case = Case::new(
        &[("redact", JSON_REDACT)],
        "[plugins.redact]\nconfig = \"password\"\ntimeout_ms = 1000\n",
    )
    .bodies();
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        for size in [100, 64 * 1024, 1 << 20] {
            let label = format!("{mode:?}, {size} bytes");
            let response = post_json(&d, size, &label).await;
            let seen = d.upstream.seen().last().unwrap().clone();
            assert_same(
                &seen.body,
                &redacted(size),
                &format!("{label}, at the upstream"),
            );
            // Set by the body handler: the headers waited for the whole body.
            assert_eq!(seen.header("x-redacted").as_deref(), Some("1"), "{label}");
            if let Some(length) = seen.header("content-length") {
                assert_eq!(
                    length,
                    seen.body.len().to_string(),
                    "{label}: upstream's content-length"
                );
            }
            assert_same(
                &response.body,
                &redacted(size),
                &format!("{label}, at the client"),
            );
            assert_length_fits(&response, &label);

            let response = d
                .envoy
                .get(&format!("/generate?bytes={size}&json"))
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
            assert_same(
                &response.body,
                &redacted(size),
                &format!("{label}, response"),
            );
            assert_eq!(
                response.header_values("x-redacted"),
                ["1"],
                "{label}, response"
            );
            assert_length_fits(&response, &label);
        }
        let response = d
            .envoy
            .send(
                &HttpRequest::new("POST", "/anything")
                    .header("content-type", "application/json")
                    .chunked(in_chunks(&generated(200_000, true))),
            )
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        assert_same(
            &response.body,
            &redacted(200_000),
            &format!("{mode:?}, chunked upload"),
        );
    }
}

/// A plugin built against the previous contract (0.2.0: body handlers without headers) runs
/// in the same chain as a current one, each with its own contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_of_both_contract_versions_share_a_chain() {
    let case = Case::new(
        &[("10-redact", JSON_REDACT), ("20-previous", CONTRACT_0_2)],
        "[plugins.10-redact]\nconfig = \"password\"\ntimeout_ms = 1000\n\
         [plugins.20-previous]\ntimeout_ms = 1000\n",
    )
    .bodies();
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let size = 64 * 1024;
        let label = format!("{mode:?}");
        let shouted = redacted(size).to_ascii_uppercase();
        let response = post_json(&d, size, &label).await;
        let seen = d.upstream.seen().last().unwrap().clone();
        assert_same(&seen.body, &shouted, &format!("{label}, at the upstream"));
        assert_eq!(
            seen.header("x-contract").as_deref(),
            Some("0.2.0"),
            "{label}"
        );
        assert_eq!(seen.header("x-redacted").as_deref(), Some("1"), "{label}");
        assert_same(&response.body, &shouted, &format!("{label}, at the client"));
        assert_eq!(response.header_values("x-contract"), ["0.2.0"], "{label}");
        assert_length_fits(&response, &label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_bodies_over_http2_both_ways() {
    let case = Case::new(&[("tag", TAGGER)], "[plugins.tag]\nconfig = \"T\"\n")
        .bodies()
        .upstream_http2();
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let request = HttpRequest::new("POST", "/anything")
            .http2()
            .header("content-type", "application/grpc")
            .chunked(vec![b"pay".to_vec(), b"load".to_vec()])
            .trailer("x-client-trailer", "yes");
        let response = d.envoy.send(&request).await.unwrap();
        assert_eq!(response.status, 200, "{mode:?}");
        let seen = d.upstream.seen()[0].clone();
        // Every body message gets the tag appended: how many there are depends on how the
        // body was cut, so only its start and end are fixed.
        let upstream_body = String::from_utf8(seen.body.clone()).unwrap();
        assert_eq!(
            upstream_body.replace('T', ""),
            "payload",
            "{mode:?}: {upstream_body}"
        );
        assert!(
            upstream_body.starts_with("pay"),
            "{mode:?}: {upstream_body}"
        );
        let trailer = |name: &str| {
            seen.trailers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(
            trailer("x-client-trailer").as_deref(),
            Some("yes"),
            "{mode:?}"
        );
        assert_eq!(trailer("x-chain").as_deref(), Some("T"), "{mode:?}");
        assert_eq!(seen.header("x-chain").as_deref(), Some("T"), "{mode:?}");
        let mut trailers = response.trailers.clone();
        trailers.sort();
        assert_eq!(
            trailers,
            [
                ("x-chain".to_string(), "T".to_string()),
                ("x-upstream-trailer".to_string(), "seen".to_string()),
            ],
            "{mode:?}"
        );
        assert_eq!(response.header_values("x-chain"), ["T"], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_metadata_and_rerouting() {
    let mut case = Case::new(&[("probe", CONTEXT_PROBE)], "")
        // Metadata for the plugin to read, set by a filter before the plugins'.
        .edit(
            HTTP_FILTERS,
            &lua_filter(
                r#"request_handle:streamInfo():dynamicMetadata():set("probe", "in", "from-envoy")"#,
            ),
        )
        // Shows the metadata the plugin set.
        .edit(
            "                      domains: [\"*\"]\n",
            "                      domains: [\"*\"]
                      response_headers_to_add:
                        - header: { key: x-seen-path, value: \"%DYNAMIC_METADATA(wasm:seen-path)%\" }
",
        )
        // Where a rerouted request lands.
        .edit(
            "                        - name: default\n",
            "                        - name: rerouted
                          match: { prefix: \"/rerouted\" }
                          direct_response: { status: 200, body: { inline_string: \"rerouted\" } }
                        - name: default\n",
        );
    case.request_attributes = vec!["request.path", "source.address", "xds.route_name"];
    case.metadata_namespaces = vec!["probe"];
    case.metadata_set = vec!["wasm"];
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let response = d.envoy.get("/anything/here?q=1").await.unwrap();
        assert_eq!(response.status, 200, "{mode:?}");
        let seen = d.upstream.seen()[0].clone();
        assert_eq!(
            seen.header("x-attr-path").as_deref(),
            Some("/anything/here?q=1"),
            "{mode:?}"
        );
        let source = seen.header("x-attr-source").unwrap();
        assert!(source.starts_with("127.0.0.1:"), "{mode:?}: {source}");
        assert_eq!(
            seen.header("x-attr-route").as_deref(),
            Some("default"),
            "{mode:?}"
        );
        assert_eq!(
            seen.header("x-metadata-in").as_deref(),
            Some("\"from-envoy\""),
            "{mode:?}"
        );
        assert_eq!(
            response.header_values("x-seen-path"),
            ["/anything/here?q=1"],
            "{mode:?}"
        );
        let rerouted = d
            .envoy
            .request(
                "GET",
                "/anything",
                &[("x-reroute", "/rerouted")],
                Vec::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        assert_eq!(rerouted.body, b"rerouted", "{mode:?}");
        assert_eq!(
            d.upstream.seen().len(),
            1,
            "{mode:?}: rerouted request reached httpbin"
        );
    }
}

/// `faulty` (as `10-faulty`, with `settings`) in front of the ASM plugin.
fn faulty_chain(faulty: Component, settings: &str) -> Case {
    Case::new(
        &[("10-faulty", faulty), ("20-asm", ASM_DEMO)],
        &format!("[plugins.10-faulty]\n{settings}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_zoo_costs_only_its_own_phase_and_envoy_keeps_serving() {
    // (fixture, settings, the outcome recorded)
    let zoo: [(Component, &str, &str); 6] = [
        (TRAP, "config = \"panic\"", "trap"),
        (TRAP, "config = \"unreachable\"", "trap"),
        (SPIN, "timeout_ms = 50", "deadline"),
        (MEMORY_HOG, "memory_limit_mib = 16", "memory_limit"),
        (RECURSE, "", "trap"),
        (MISBEHAVE, "config = \"bad-name\"", "invalid_output"),
    ];
    for (fixture, settings, outcome) in zoo {
        let label = format!("{} ({settings})", fixture.name());
        let open = faulty_chain(
            fixture,
            &format!("{settings}\nfailure_policy = \"fail-open\""),
        );
        let closed = faulty_chain(
            fixture,
            &format!("{settings}\nfailure_policy = \"fail-closed\"\nfailure_status = 503"),
        );
        for mode in Mode::BOTH {
            let d = Deployment::start(mode, &open).await;
            for _ in 0..2 {
                let response = d.envoy.get("/headers").await.unwrap();
                // The rest of the chain ran.
                let json = response.assert_tagged_by_asm(&format!("{mode:?} {label}, fail-open"));
                for dropped in ["X-Trap-Was-Here", "X-Misbehave-Tried"] {
                    assert!(
                        json["headers"].get(dropped).is_none(),
                        "{mode:?} {label}: the failed plugin's changes were dropped"
                    );
                }
            }
            assert!(
                d.plugin_outcomes("10-faulty", outcome).await >= 2,
                "{mode:?} {label}: counted as {outcome}"
            );

            let d = Deployment::start(mode, &closed).await;
            let response = d.envoy.get("/headers").await.unwrap();
            assert_eq!(response.status, 503, "{mode:?} {label}, fail-closed");
            assert!(
                d.upstream.seen().is_empty(),
                "{mode:?} {label}: upstream touched"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_inside_its_budget_is_not_a_failure() {
    let case = faulty_chain(SLOW, "config = \"10\"\ntimeout_ms = 500");
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let response = d.envoy.get("/headers").await.unwrap();
        assert_eq!(response.status, 200, "{mode:?}");
        let json = response.json().unwrap();
        assert_eq!(json["headers"]["X-Slow"], "done", "{mode:?}");
        assert_eq!(
            d.plugin_outcomes("10-faulty", "deadline").await,
            0,
            "{mode:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_plugin_file_is_served_without_a_restart() {
    let case = Case::new(&[("asm", ASM_DEMO)], "");
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let tag = |response: &HttpResponse| response.header_values("x-ext-proc-header").join(",");
        let before = d.envoy.get("/headers").await.unwrap();
        assert_eq!(tag(&before), "hello-from-asm", "{mode:?}");
        replace_file(&d.plugins_dir().join("asm.wasm"), &ASM_V2.bytes());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let response = d.envoy.get("/headers").await.unwrap();
            assert_eq!(response.status, 200, "{mode:?}");
            if tag(&response) == "hello-from-asm-v2" {
                break;
            }
            assert_eq!(
                tag(&response),
                "hello-from-asm",
                "{mode:?}: old or new, nothing else"
            );
            assert!(
                Instant::now() < deadline,
                "{mode:?}: the new version never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// State outlives the exchange and a rate limit holds in both modes: the same plugins keep
/// their counters in the host's state store, or in the module's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_between_exchanges_both_ways() {
    let case = Case::new(
        &[("10-rate", RATE_LIMIT), ("20-probe", KV_PROBE)],
        "[plugins.10-rate]\nconfig = \"limit=3;window_ms=60000;key_header=x-api-key\"\n\
         [plugins.20-probe]\nconfig = \"roundtrip:\"\n",
    );
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        let label = format!("{mode:?}");
        for (i, value) in ["one", "two", "three"].into_iter().enumerate() {
            let response = d
                .envoy
                .request(
                    "GET",
                    "/headers",
                    &[("x-api-key", "k"), ("x-value", value)],
                    Vec::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("{label}: {e:#}"));
            assert_eq!(response.status, 200, "{label}");
            let remaining = (2 - i).to_string();
            assert_eq!(
                response.header_values("x-ratelimit-remaining"),
                [remaining.as_str()],
                "{label}"
            );
            let seen = d.upstream.seen().last().unwrap().clone();
            assert_eq!(
                seen.header("x-kv-hits"),
                Some((i + 1).to_string()),
                "{label}"
            );
        }
        let refused = d
            .envoy
            .request("GET", "/headers", &[("x-api-key", "k")], Vec::new())
            .await
            .unwrap();
        assert_eq!(refused.status, 429, "{label}");
        assert_eq!(
            d.upstream.seen().len(),
            3,
            "{label}: the fourth never went up"
        );
        // A key past the store's 512-byte key bound is limited like any other.
        let long = "k".repeat(600);
        let statuses = four_requests_as(&d, &long).await;
        assert_eq!(statuses, [200, 200, 200, 429], "{label}: a 600-byte key");
    }
}

/// The statuses of four requests to `/headers` with `x-api-key: key`, one after the other.
async fn four_requests_as(d: &Deployment, key: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = d
            .envoy
            .request("GET", "/headers", &[("x-api-key", key)], Vec::new())
            .await
            .unwrap();
        statuses.push(response.status);
    }
    statuses
}

/// No client can switch a plugin off: a client whose requests make a plugin trap (here, a
/// missing header it `expect`s) gets the failure policy on its own requests only. Valid
/// requests from other clients -- interleaved with the failing ones, and after a long run of
/// them with nobody else calling -- are always called: never refused (fail-closed), never let
/// past the plugin (fail-open). Nothing is quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_can_switch_a_plugin_off() {
    for policy in ["fail-closed", "fail-open"] {
        let mut case = Case::new(
            &[("10-check", TRAP)],
            &format!(
                "[plugins.10-check]\nconfig = \"expect:x-token\"\nfailure_policy = \"{policy}\"\n"
            ),
        );
        case.request_attributes = vec!["source.address"];
        for mode in Mode::BOTH {
            let label = format!("{mode:?}, {policy}");
            let d = Deployment::start(mode, &case).await;
            let crafted = || HttpRequest::new("GET", "/headers").from("127.0.0.1");
            let valid = |from: &str| {
                HttpRequest::new("GET", "/headers")
                    .header("x-token", "t-1")
                    .from(from)
            };
            let assert_checked = |response: HttpResponse, label: &str| {
                assert_eq!(response.status, 200, "{label}");
                let echoed = response.json().unwrap();
                assert_eq!(echoed["headers"]["X-Trap-Checked"], "t-1", "{label}");
            };
            for i in 0..30 {
                let response = d.envoy.send(&crafted()).await.unwrap();
                match policy {
                    "fail-closed" => assert_eq!(response.status, 500, "{label}: crafted {i}"),
                    _ => {
                        assert_eq!(response.status, 200, "{label}: crafted {i}");
                        let echoed = response.json().unwrap();
                        assert!(echoed["headers"].get("X-Trap-Checked").is_none());
                    }
                }
                if i % 3 == 0 {
                    let response = d.envoy.send(&valid("127.0.0.2")).await.unwrap();
                    assert_checked(response, &format!("{label}: valid after crafted {i}"));
                }
            }
            // A long run of crafted requests with nobody else calling, then a valid one.
            for _ in 0..30 {
                d.envoy.send(&crafted()).await.unwrap();
            }
            let response = d.envoy.send(&valid("127.0.0.3")).await.unwrap();
            assert_checked(response, &format!("{label}: valid after a long run"));
            assert_eq!(
                d.plugin_outcomes("10-check", "quarantined").await,
                0,
                "{label}"
            );
            // Every crafted request failed for itself (in-process, counting sends two more of
            // its own, without the header).
            let traps = d.plugin_outcomes("10-check", "trap").await;
            assert!((60..=62).contains(&traps), "{label}: {traps}");
        }
    }
}

/// A plugin that traps on every call, from whoever, is still quarantined within a few
/// requests -- its failing clients get the policy without a call -- and probed when the
/// back-off ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_failing_on_every_call_is_quarantined_and_probed() {
    let mut case = Case::new(
        &[("10-broken", TRAP)],
        "[plugins.10-broken]\nbreaker_backoff_ms = 3000\n",
    );
    case.request_attributes = vec!["source.address"];
    for mode in Mode::BOTH {
        let label = format!("{mode:?}");
        let d = Deployment::start(mode, &case).await;
        let from = |n: u32| HttpRequest::new("GET", "/headers").from(&format!("127.0.0.{n}"));
        // Five failures from three clients trip it.
        for n in [1, 2, 3, 1, 2] {
            assert_eq!(d.envoy.send(&from(n)).await.unwrap().status, 500, "{label}");
        }
        let tripped = Instant::now();
        for n in [1, 2, 3, 1, 2, 3] {
            assert_eq!(d.envoy.send(&from(n)).await.unwrap().status, 500, "{label}");
        }
        assert_eq!(d.plugin_outcomes("10-broken", "trap").await, 5, "{label}");
        // In-process, counting sends a request of its own (from 127.0.0.1, quarantined too).
        let quarantined = d.plugin_outcomes("10-broken", "quarantined").await;
        assert!((6..=8).contains(&quarantined), "{label}: {quarantined}");
        // After the back-off, one probe call: it fails, and the quarantine goes on.
        tokio::time::sleep(Duration::from_millis(3200).saturating_sub(tripped.elapsed())).await;
        for n in [1, 2, 3] {
            assert_eq!(d.envoy.send(&from(n)).await.unwrap().status, 500, "{label}");
        }
        assert_eq!(d.plugin_outcomes("10-broken", "trap").await, 6, "{label}");
    }
}

/// The token-introspect plugin checking tokens with `endpoint`, after `defaults` (TOML).
fn token_check(endpoint: &Service, defaults: &str) -> Case {
    Case::new(
        &[("10-token", TOKEN_INTROSPECT)],
        &format!(
            "{defaults}[plugins.10-token]\nconfig = \"endpoint={}/introspect\"\n\
             http_allow = [\"{}\"]\n",
            endpoint.origin(),
            endpoint.origin()
        ),
    )
}

/// A token check calling out to its endpoint, in both modes: the answer cached in the state
/// store, an inactive token refused before the upstream, and an endpoint slower than the
/// plugin's budget answered by the plugin's choice (503) at the budget, not the endpoint's
/// pace. In Envoy's process the wait holds no worker (see the test after this one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_calls_both_ways() {
    let endpoint = introspection(Duration::ZERO).await;
    let slow = introspection(Duration::from_secs(3)).await;
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &token_check(&endpoint, "")).await;
        let before = endpoint.received();
        for _ in 0..3 {
            let response = with_token(&d.envoy, Some("good")).await;
            assert_eq!(response.status, 200, "{mode:?}: {}", d.envoy.log());
            assert_eq!(
                response.json().unwrap()["headers"]["X-Auth-Subject"],
                "alice",
                "{mode:?}"
            );
        }
        assert_eq!(endpoint.received() - before, 1, "{mode:?}: cached");
        let refused = with_token(&d.envoy, Some("revoked")).await;
        assert_eq!(refused.status, 401, "{mode:?}");
        assert_eq!(d.upstream.seen().len(), 3, "{mode:?}");
        // Counted per destination and result, in Envoy's stats in-process.
        let ok = format!("http://{}", endpoint.address);
        let calls = match &d.host {
            Some(host) => host
                .metrics()
                .outbound_requests("default", "10-token", &ok, "ok"),
            None => d
                .module_stats("outbound_requests")
                .await
                .iter()
                .filter(|(name, _)| {
                    name.starts_with("outbound_requests.chain.default.plugin.10-token.")
                        && name.ends_with(".result.ok")
                })
                .map(|(_, n)| n)
                .sum(),
        };
        assert_eq!(calls, 2, "{mode:?}");

        let budget = "[defaults]\ntimeout_ms = 100\n[envoy]\nmessage_timeout_ms = 200\n";
        let d = Deployment::start(mode, &token_check(&slow, budget)).await;
        let started = Instant::now();
        let response = with_token(&d.envoy, Some("good")).await;
        let took = started.elapsed();
        assert_eq!(response.status, 503, "{mode:?}: {}", d.envoy.log());
        assert!(
            took < Duration::from_secs(2),
            "{mode:?}: cut at the budget, not the endpoint: {took:?}"
        );
    }
}

/// In Envoy's process, a plugin waiting on a slow endpoint holds no worker: while one
/// request's token check waits a second, requests on another route (a chain that calls out
/// to nothing) are answered as fast as on an idle Envoy. Envoy runs two workers here, and
/// each request opens its own connection: a worker held for the wait would hold about half
/// of them for most of a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_a_plugin_waiting_on_the_network_holds_no_worker() {
    let endpoint = introspection(Duration::from_secs(1)).await;
    let case = Case::new(
        &[("asm", ASM_DEMO), ("checkout/10-token", TOKEN_INTROSPECT)],
        &format!(
            "[defaults]\ntimeout_ms = 3000\n\
             [chains.checkout.plugins.10-token]\nconfig = \"endpoint={}/introspect\"\n\
             http_allow = [\"{}\"]\n",
            endpoint.origin(),
            endpoint.origin()
        ),
    );
    let d = Deployment::start(Mode::InProcess, &case).await;
    let idle = ten_quick_requests(&d).await;

    let envoy = &d.envoy;
    let waiting = async {
        let started = Instant::now();
        let response = envoy
            .request(
                "GET",
                "/checkout/cart",
                &[("authorization", "Bearer good")],
                Vec::new(),
            )
            .await
            .unwrap();
        (response, started.elapsed())
    };
    let meanwhile = async {
        // Once the check is under way.
        tokio::time::sleep(Duration::from_millis(150)).await;
        ten_quick_requests(&d).await
    };
    let ((response, waited), meanwhile) = tokio::join!(waiting, meanwhile);
    assert_eq!(response.status, 200, "{}", d.envoy.log());
    let checked = d.upstream.seen();
    let checked = checked.iter().find(|r| r.path == "/checkout/cart").unwrap();
    assert_eq!(checked.header("x-auth-subject").as_deref(), Some("alice"));
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert_eq!(endpoint.received(), 1);
    let slowest = |took: &[Duration]| took.iter().max().copied().unwrap_or_default();
    eprintln!("idle: {idle:?}\nwhile one waits: {meanwhile:?}");
    assert!(
        slowest(&meanwhile) < slowest(&idle) + Duration::from_millis(200),
        "a request waited behind the check: idle {idle:?}, while it waited {meanwhile:?}"
    );
}

/// How long each of ten requests to `/headers` took, one after the other.
async fn ten_quick_requests(d: &Deployment) -> Vec<Duration> {
    let mut took = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let response = d.envoy.get("/headers").await.unwrap();
        took.push(started.elapsed());
        response.assert_tagged_by_asm("the default chain");
    }
    took
}

/// The state store in Redis, in both modes: a rate limit kept across exchanges, and a Redis
/// outage answered by the plugin's choice (`on_store_error = deny`: 503) within its budget.
/// In Envoy's process the operations complete off the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_in_redis_both_ways_and_an_outage_is_the_plugins_choice() {
    let mut redis = Redis::start().unwrap();
    let case = Case::new(
        &[("10-rate", RATE_LIMIT)],
        &format!(
            "[kv]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout_ms = 200\n\
             [plugins.10-rate]\nconfig = \"limit=3;window_ms=60000;key_header=x-api-key;\
             on_store_error=deny\"\n",
            redis.url()
        ),
    );
    let mut deployments = Vec::new();
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        // A key of its own per mode: both count in the one Redis.
        let statuses = four_requests_as(&d, &format!("{mode:?}")).await;
        assert_eq!(
            statuses,
            [200, 200, 200, 429],
            "{mode:?}: {}",
            d.envoy.log()
        );
        deployments.push(d);
    }
    redis.stop();
    for d in &deployments {
        let started = Instant::now();
        let response = d
            .envoy
            .request("GET", "/headers", &[("x-api-key", "other")], Vec::new())
            .await
            .unwrap();
        assert_eq!(response.status, 503, "{:?}: {}", d.mode, d.envoy.log());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}: answered, not hung",
            d.mode
        );
        // Counted, in Envoy's stats in-process.
        let failed: u64 = match &d.host {
            Some(host) => ["unavailable", "timeout"]
                .map(|r| {
                    host.metrics()
                        .kv_operations("default", "10-rate", "increment_in_window", r)
                })
                .iter()
                .sum(),
            None => d
                .module_stats("kv_operations")
                .await
                .iter()
                .filter(|(name, _)| {
                    name.contains(".operation.increment_in_window.")
                        && (name.ends_with(".result.unavailable")
                            || name.ends_with(".result.timeout"))
                })
                .map(|(_, n)| n)
                .sum(),
        };
        assert!(failed >= 1, "{:?}: {failed}", d.mode);
    }
}

/// In Envoy's process, what arrives while a plugin waits follows it, in order: the request's
/// body chunks and trailers come while the token check waits on its endpoint, wait behind it,
/// and then go through the rest of the chain (which shouts the body) to the upstream, whole
/// (HTTP/2 both sides, which carries trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_what_arrives_while_a_plugin_waits_follows_it_in_order() {
    let endpoint = introspection(Duration::from_millis(300)).await;
    let case = Case::new(
        &[
            ("asm", ASM_DEMO),
            ("checkout/10-token", TOKEN_INTROSPECT),
            ("checkout/20-shout", SHOUT),
        ],
        &format!(
            "[defaults]\ntimeout_ms = 3000\n\
             [chains.checkout.plugins.10-token]\nconfig = \"endpoint={}/introspect\"\n\
             http_allow = [\"{}\"]\n",
            endpoint.origin(),
            endpoint.origin()
        ),
    )
    .upstream_http2();
    let d = Deployment::start(Mode::InProcess, &case).await;
    let body = generated(100_000, false);
    let response = d
        .envoy
        .send(
            &HttpRequest::new("POST", "/checkout/cart")
                .header("authorization", "Bearer good")
                .chunked(in_chunks(&body))
                .paced(Duration::from_millis(40))
                .trailer("x-checksum", "abc")
                .http2(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", d.envoy.log());
    let seen = d.upstream.seen();
    let seen = seen.last().unwrap();
    assert_eq!(seen.header("x-auth-subject").as_deref(), Some("alice"));
    assert_same(&seen.body, &body.to_ascii_uppercase(), "at the upstream");
    assert_eq!(seen.trailers, [("x-checksum".into(), b"abc".to_vec())]);
    assert_eq!(endpoint.received(), 1);
}

/// In Envoy's process, a plugin's requests to an origin the configuration maps to an Envoy
/// cluster (`[module] http_clusters`) go out through Envoy's callouts to that cluster: Envoy's
/// own counters see them, the plugin gets the answer as from any request, and an endpoint
/// slower than the plugin's budget is cut at the budget all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_requests_go_through_the_cluster_their_origin_maps_to() {
    let through_envoy = |endpoint: &Service, defaults: &str| {
        token_check(endpoint, defaults).through_cluster(
            &endpoint.origin(),
            "introspection",
            endpoint.address,
        )
    };
    let endpoint = introspection(Duration::ZERO).await;
    let d = Deployment::start(Mode::InProcess, &through_envoy(&endpoint, "")).await;
    for _ in 0..2 {
        let response = with_token(&d.envoy, Some("good")).await;
        assert_eq!(response.status, 200, "{}", d.envoy.log());
        assert_eq!(
            response.json().unwrap()["headers"]["X-Auth-Subject"],
            "alice"
        );
    }
    assert_eq!(with_token(&d.envoy, Some("revoked")).await.status, 401);
    assert_eq!(endpoint.received(), 2, "each token checked once");
    let stats = d
        .envoy
        .admin_get("/stats?filter=cluster.introspection.upstream_rq_completed")
        .await
        .unwrap();
    assert!(
        stats.contains("cluster.introspection.upstream_rq_completed: 2"),
        "Envoy's cluster carried both checks: {stats}"
    );

    let slow = introspection(Duration::from_secs(3)).await;
    let d = Deployment::start(
        Mode::InProcess,
        &through_envoy(&slow, "[defaults]\ntimeout_ms = 100\n"),
    )
    .await;
    let started = Instant::now();
    let response = with_token(&d.envoy, Some("good")).await;
    assert_eq!(response.status, 503, "{}", d.envoy.log());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut at the budget"
    );
    assert_eq!(slow.received(), 1);
}
