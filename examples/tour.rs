//! A tour of the client library: three processes at once with their output
//! streamed as it comes, stdin written to one of them, and a file written
//! and read back, all through one lazily started server.
//!
//! ```sh
//! cargo build && cargo run --example tour            # the server built next to it
//! cargo run --example tour -- "ssh host exec-server --stdio"
//! ```

use exec_server::client::{Client, ClientError, Event, ServerCommand, StartOptions, Stream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let command = match std::env::args().nth(1) {
        Some(line) => ServerCommand::parse(&line)?,
        // target/debug/examples/tour -> target/debug/exec-server
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe
                .parent()
                .and_then(|d| d.parent())
                .ok_or("no target dir")?;
            ServerCommand::new(dir.join("exec-server")).arg("--stdio")
        }
    };
    // Nothing runs until the first call.
    let client = Client::new(command);
    let dir = std::env::temp_dir().join(format!("exec-server-tour-{}", std::process::id()));

    // Files: a directory and a file in it, read back.
    client.create_directory(&dir, true).await?;
    let file = dir.join("greeting.txt");
    client.write_file(&file, b"hello from the tour\n").await?;
    assert_eq!(client.read_file(&file).await?, b"hello from the tour\n");

    // Three processes at once.
    let ticker = client
        .start(
            StartOptions::new(
                "ticker",
                [
                    "sh",
                    "-c",
                    "for i in 1 2 3; do echo tick $i; sleep 0.05; done",
                ],
            )
            .cwd(&dir),
        )
        .await?;
    let upper = client
        .start(
            StartOptions::new("upper", ["tr", "a-z", "A-Z"])
                .cwd(&dir)
                .pipe_stdin(true),
        )
        .await?;
    let reader = client
        .start(StartOptions::new("reader", ["cat", "greeting.txt"]).cwd(&dir))
        .await?;
    upper.write(b"shouted through stdin\n").await?;
    upper.close_stdin().await?;

    let results = futures_join(vec![ticker, upper, reader]).await?;
    for (id, code, output) in &results {
        println!(
            "{id}: exit {code}: {}",
            output.trim_end().replace('\n', " | ")
        );
    }
    assert!(results.iter().all(|(_, code, _)| *code == 0));
    assert!(
        results
            .iter()
            .any(|(_, _, out)| out.contains("SHOUTED THROUGH STDIN"))
    );

    client.remove(&dir, true, true).await?;
    client.shutdown().await;
    Ok(())
}

/// Drive each process to its end on a task of its own, streaming its
/// output as it arrives; (id, exit code, output) of each.
async fn futures_join(
    processes: Vec<exec_server::client::Process>,
) -> Result<Vec<(String, i32, String)>, ClientError> {
    let mut tasks = Vec::new();
    for mut process in processes {
        tasks.push(tokio::spawn(async move {
            let id = process.id().to_string();
            let mut output = String::new();
            while let Some(event) = process.next_event().await? {
                match event {
                    Event::Output { stream, data } => {
                        let text = String::from_utf8_lossy(&data);
                        let tag = if stream == Stream::Stderr {
                            "err"
                        } else {
                            "out"
                        };
                        eprintln!("[{id} {tag}] {}", text.trim_end());
                        output.push_str(&text);
                    }
                    Event::Lost { bytes } => eprintln!("[{id}] {bytes} bytes of output were lost"),
                    Event::Exited(_) => {}
                    Event::Closed => break,
                }
            }
            let status = process.wait().await?;
            Ok::<_, ClientError>((id, status.code, output))
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("the task ran to its end")?);
    }
    Ok(results)
}
