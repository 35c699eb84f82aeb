//! One call of one plugin on one message, made the same way for the chain's plugins and for
//! its shadows: the plugin's breaker admits it, the stream's instance of the plugin is taken
//! (or made), the call runs on the plugin's budget, the guard checks what it made, and the
//! outcome is counted and recorded in the breaker. A call that fails leaves its changes rolled
//! back and its plugin out of the stream; what its failure means to the exchange is the
//! caller's to decide.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::plugin_state::InstanceState;
use crate::breaker::{Admission, Call, Client, Transition};
use crate::http::{ExchangeContext, HeaderChanges, HeaderMap, Message, Phase};
use crate::metrics::PluginMetrics;
use crate::registry::Generation;
use crate::runtime::{Outcome, Plugin, PluginError};

/// The `tracing` target of the spans meant for traces: only a trace layer enables it.
pub const TRACE_TARGET: &str = "wasm_extproc::trace";
/// The span of one plugin call (instantiation included), child of the stream's.
pub const CALL_SPAN: &str = "plugin call";
/// The attribute that tells the breaker clients apart.
pub const SOURCE_ADDRESS: &str = "source.address";

/// What every plugin call on one message shares.
pub(super) struct Pass<'a> {
    pub(super) generation: &'a Generation,
    pub(super) phase: Phase,
    pub(super) context: &'a Arc<ExchangeContext>,
    /// When the message arrived: a plugin instantiated for it waits for a full pool from then.
    pub(super) arrived: Instant,
}

/// Whose answer a call makes: it decides what the call is traced as and what the guard checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// A plugin of the chain, whose answer is applied: its call is traced (when a trace layer
    /// wants it), and the headers open to it are checked as well as its message.
    Serving,
    /// A shadow, whose answer is only compared with the serving plugin's and then dropped: it
    /// is not traced, and the guard checks its message only.
    Shadow,
}

/// The plugin a call is for.
#[derive(Clone, Copy)]
pub(super) struct Callee<'a> {
    pub(super) plugin: &'a Plugin,
    pub(super) metrics: &'a PluginMetrics,
    pub(super) role: Role,
}

/// How a call went.
pub(super) enum Called {
    /// The plugin answered, and the guard let what it made through. Its changes are not yet
    /// kept: the caller checkpoints what it keeps.
    Answered(Answered),
    /// It was not admitted, could not be instantiated, failed, or made what the guard refused:
    /// its changes are rolled back and it is out of the stream, the failure counted.
    Failed(PluginError),
    /// Its instance went back early (no phase it handles was to come): it was not called.
    Gone,
}

/// What a plugin answered, with the changes the guard checked.
pub(super) struct Answered {
    pub(super) outcome: Outcome,
    /// Its changes to a header or trailer message.
    pub(super) changes: Option<HeaderChanges>,
    /// A serving body handler's changes to the headers open to it.
    pub(super) opened: Option<HeaderChanges>,
}

impl Pass<'_> {
    /// Calls `callee` on `message`, lending a body handler whose contract takes them its
    /// direction's `headers` (changed in place). The message comes back as the plugin left it,
    /// or as it came where the call failed.
    pub(super) async fn call(
        &self,
        callee: Callee<'_>,
        slot: &mut InstanceState,
        mut message: Message,
        mut headers: Option<&mut HeaderMap>,
    ) -> (Message, Called) {
        let Callee { plugin, role, .. } = callee;
        let started = Instant::now();
        if let Admission::Quarantined(left) =
            plugin.breaker().admit(started, || client_of(self.context))
        {
            let error = PluginError::Quarantined(left);
            self.fail(callee, slot, &error, Duration::ZERO);
            return (message, Called::Failed(error));
        }
        let span = match role {
            // Disabled, and free, unless a trace layer wants it (the server's `[tracing]`).
            Role::Serving => tracing::trace_span!(
                target: TRACE_TARGET,
                CALL_SPAN,
                chain = plugin.chain(),
                plugin = plugin.name(),
                phase = self.phase.as_str(),
                outcome = tracing::field::Empty,
                instantiate_us = tracing::field::Empty,
            ),
            Role::Shadow => tracing::Span::none(),
        };
        let call_started = match self.instance(callee, slot, started, &span).await {
            Ok(call_started) => call_started,
            Err(error) => {
                self.fail(callee, slot, &error, started.elapsed());
                return (message, Called::Failed(error));
            }
        };
        let InstanceState::Live(instance) = slot else {
            return (message, Called::Gone);
        };
        let lent = headers
            .as_deref_mut()
            .filter(|_| plugin.contract().body_sees_headers())
            .map(std::mem::take);
        let (back, returned, result) = instance
            .call(self.phase, message, lent, self.context, call_started)
            .instrument(span.clone())
            .await;
        message = back;
        if let (Some(headers), Some(returned)) = (headers.as_deref_mut(), returned) {
            *headers = returned;
        }
        let checked = result.and_then(|outcome| {
            self.check(role, &message, headers.as_deref(), outcome)
                .map_err(PluginError::InvalidOutput)
        });
        let ended = Instant::now();
        match checked {
            Ok(answered) => {
                callee.metrics.call(self.phase, "ok", ended - started);
                span.record("outcome", "ok");
                log_transition(plugin, plugin.breaker().record(ended, Call::Succeeded));
                (message, Called::Answered(answered))
            }
            Err(error) => {
                span.record("outcome", error.kind());
                // Its changes are dropped: the message goes on as the plugin got it.
                message.rollback();
                if let Some(headers) = headers {
                    headers.rollback();
                }
                self.fail(callee, slot, &error, ended - started);
                (message, Called::Failed(error))
            }
        }
    }

    /// Readies the stream's instance of `callee` in `slot`: one that served an earlier stream
    /// if the plugin keeps them, else a fresh one. Returns when the call's budget starts: after
    /// the instantiation, which is the call's too.
    async fn instance(
        &self,
        callee: Callee<'_>,
        slot: &mut InstanceState,
        started: Instant,
        span: &tracing::Span,
    ) -> Result<Instant, PluginError> {
        let plugin = callee.plugin;
        if let InstanceState::Idle = slot
            && let Some(instance) = plugin.take_idle()
        {
            *slot = InstanceState::Live(Box::new(instance));
        }
        if let InstanceState::Idle = slot {
            let instance = plugin
                .instantiate(started, self.arrived)
                .instrument(span.clone())
                .await;
            let instantiated = Instant::now();
            span.record(
                "instantiate_us",
                (instantiated - started).as_micros() as u64,
            );
            let instance = instance?;
            callee.metrics.instantiated(instantiated - started);
            *slot = InstanceState::Live(Box::new(instance));
            return Ok(instantiated);
        }
        Ok(started)
    }

    /// Checks what a plugin made: its message and answer, and, where it serves, the headers
    /// open to it.
    fn check(
        &self,
        role: Role,
        message: &Message,
        headers: Option<&HeaderMap>,
        outcome: Outcome,
    ) -> Result<Answered, String> {
        let guard = &self.generation.guard;
        let changes = guard.check(self.phase, message, &outcome)?;
        let opened = match (role, headers) {
            (Role::Serving, Some(headers)) => {
                Some(guard.check_open_headers(self.phase.direction().headers(), headers)?)
            }
            _ => None,
        };
        Ok(Answered {
            outcome,
            changes,
            opened,
        })
    }

    /// Takes a plugin that failed (or was not let call) out of the stream, and counts the
    /// failure: in its metrics, and in its breaker where the failure was its own.
    pub(super) fn fail(
        &self,
        callee: Callee<'_>,
        slot: &mut InstanceState,
        error: &PluginError,
        took: Duration,
    ) {
        *slot = InstanceState::Skipped;
        callee.metrics.call(self.phase, error.kind(), took);
        if error.is_plugins_fault() {
            let call = Call::Failed(client_of(self.context));
            let plugin = callee.plugin;
            log_transition(plugin, plugin.breaker().record(Instant::now(), call));
        }
    }
}

/// Who sent the stream's request, as the breaker tells clients apart: Envoy's `source.address`.
fn client_of(context: &ExchangeContext) -> Option<Client> {
    Client::from_address(context.attributes.get(SOURCE_ADDRESS)?)
}

/// Logs a breaker transition: once per quarantine (or per run of failures that did not trip
/// it), not once per request.
fn log_transition(plugin: &Plugin, transition: Option<Transition>) {
    match transition {
        Some(Transition::Opened(backoff)) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            backoff_ms = backoff.as_millis() as u64,
            "plugin keeps failing for several clients; quarantined: the clients it failed for \
             get its failure policy without a call until the back-off ends and a probe call \
             succeeds; other clients' requests are still called"
        ),
        Some(Transition::Recovered) => {
            tracing::info!(
                chain = plugin.chain(),
                plugin = plugin.name(),
                "quarantined plugin recovered"
            )
        }
        Some(Transition::TooFewClients {
            failures,
            clients: 0,
        }) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            failures,
            "plugin failed {failures} calls in a row, but Envoy sends no {SOURCE_ADDRESS}, so \
             the breaker cannot tell clients apart and does not quarantine it (one client's \
             requests must not switch a plugin off for everyone): list {SOURCE_ADDRESS} in the \
             ext_proc filter's request_attributes ([module] request_attributes in Envoy's \
             process)"
        ),
        Some(Transition::TooFewClients { failures, clients }) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            failures,
            clients,
            "plugin failed {failures} calls in a row, from {clients} client(s): fewer than \
             breaker_min_clients, so not quarantined (a client's own requests cannot switch a \
             plugin off for everyone)"
        ),
        None => {}
    }
}
