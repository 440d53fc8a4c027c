//! What `serve` puts in a request (nothing, unless asked), and the
//! slowloris watchdog.

use super::*;
use handover::DrainSignal;

/// Answers whether the request carried a `DrainSignal`, and how many
/// requests the `Graceful` counted while it ran.
async fn probe(State(graceful): State<Graceful>, request: axum::extract::Request) -> String {
    let signal = request.extensions().get::<DrainSignal>().is_some();
    format!("signal={signal} in_flight={}", graceful.in_flight())
}

async fn body(addr: SocketAddr, path: &str) -> String {
    let (mut sender, _conn) = http1(addr).await;
    let response = sender.send_request(get_req(path)).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A `DrainSignal` comes from a layer on the route that reads it
/// (which counts nothing again), or from `signal_extension(true)` on the
/// loop; by default a request carries none. Either way each request is counted
/// once: the serve loop counts it before it puts a signal in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signal_comes_from_a_layer_on_the_route_or_the_option_and_requests_count_once() {
    timeout(BOUND, async {
        for option in [false, true] {
            let server = Served::start(|listener, graceful| {
                let app = Router::new()
                    .route("/plain", get(probe))
                    .route(
                        "/layered",
                        get(probe).layer(graceful.layer().signal_extension(true)),
                    )
                    .with_state(graceful.clone());
                handover::serve(listener, app, graceful).signal_extension(option)
            })
            .await;
            assert_eq!(
                body(server.addr, "/plain").await,
                format!("signal={option} in_flight=1")
            );
            assert_eq!(
                body(server.addr, "/layered").await,
                "signal=true in_flight=1",
                "the route's layer counts nothing again"
            );
            server.graceful.start_drain();
            let report = server.task.await.unwrap().unwrap();
            assert_eq!(report.requests_forced, 0);
        }
    })
    .await
    .unwrap();
}

/// A client that opens a connection and sends a request head slowly,
/// or nothing, is closed at the header read timeout: not before it, and
/// long before anything else would close it (within five times the
/// timeout, where the watchdog promises a quarter more and the rest is
/// this loaded machine's scheduling); one that sends requests all along is
/// not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_silent_http1_client_is_closed_at_the_header_read_timeout() {
    timeout(BOUND, async {
        const TIMEOUT: Duration = Duration::from_millis(800);
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app(Calls::default()), graceful).header_read_timeout(TIMEOUT)
        })
        .await;
        let started = Instant::now();
        let silent = TcpStream::connect(server.addr).await.unwrap();
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        let (mut busy, _conn) = http1(server.addr).await;
        let dripping = tokio::spawn(async move {
            // One byte of a head every 100 ms: never a whole head.
            for byte in
                b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
            {
                if slow.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut rest = Vec::new();
            let _ = slow.read_to_end(&mut rest).await;
            (started.elapsed(), rest)
        });
        let closed_at = |mut stream: TcpStream| async move {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            (started.elapsed(), rest)
        };
        let silent = tokio::spawn(closed_at(silent));
        // The busy client sends a request every 100 ms throughout.
        while !silent.is_finished() || !dripping.is_finished() {
            let response = busy.send_request(get_req("/")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (what, (took, rest)) in [
            ("silent", silent.await.unwrap()),
            ("slow", dripping.await.unwrap()),
        ] {
            assert!(rest.is_empty(), "{what}: closed without an answer");
            assert!(
                took >= TIMEOUT && took < TIMEOUT * 5,
                "{what}: closed after {took:?}"
            );
        }
        let response = busy.send_request(get_req("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "the busy client stays");
    })
    .await
    .unwrap();
}
