//! A scripted apiserver for reconcile tests: the reconciler runs against a `tower-test` mock
//! service, and the test answers each request it expects, in order, checking method, path,
//! query and body. A request the script does not expect is never answered, so the reconcile
//! does not finish and the test fails on its timeout.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::Value;
use tower_test::mock::{self, Handle};

use crate::metrics::Metrics;
use crate::reconcile::Context;

pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request as the apiserver saw it.
#[derive(Debug)]
pub struct Seen {
    pub query: String,
    pub body: Value,
}

impl ApiServer {
    /// A reconcile context whose client talks to the returned script.
    pub fn context() -> (Arc<Context>, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "shotover-operator".to_owned(),
                instance: Some("test".to_owned()),
            },
        );
        let ctx = Context::new(client, recorder, Arc::new(Metrics::default()));
        (Arc::new(ctx), ApiServer { handle })
    }

    /// Waits for the next request, checks its method and path, and answers `status` with
    /// `response` (`None`: echo the request body back, as an apply or create would).
    pub async fn expect(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        response: Option<Value>,
    ) -> Seen {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(2), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
                .unwrap_or_else(|| panic!("the client went away; expected {method} {path}"));
        let seen_method = request.method().as_str().to_owned();
        let seen_path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON request body")
        };
        assert_eq!(
            (seen_method.as_str(), seen_path.as_str()),
            (method, path),
            "unexpected request, body {body}"
        );
        let answer = response.unwrap_or_else(|| body.clone());
        let answer = if status >= 400 {
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": answer.as_str().unwrap_or("refused"),
                "reason": match status { 404 => "NotFound", 409 => "Conflict", _ => "Forbidden" },
                "code": status,
            })
        } else {
            answer
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).expect("JSON")))
                .expect("response"),
        );
        Seen { query, body }
    }

    /// An apply of an object the topology is to own: the read that checks whose it is
    /// (answered 404: it does not exist yet), then the apply itself.
    pub async fn expect_apply(&mut self, path: &str, status: u16, response: Option<Value>) -> Seen {
        self.expect("GET", path, 404, None).await;
        self.expect("PATCH", path, status, response).await
    }

    /// Answers one Event creation and returns the Event.
    pub async fn expect_event(&mut self, namespace: &str) -> Value {
        self.expect(
            "POST",
            &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"),
            201,
            None,
        )
        .await
        .body
    }

    /// Checks that no request is pending.
    pub async fn expect_nothing_more(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}
