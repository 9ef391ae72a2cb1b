//! Arbitrary configuration files through what `lb run` does with one: `config::file::parse` (what
//! `load` does after reading the file), the node addresses from the environment, then the control
//! loop's build (lb-core's validation, the table build). Raw bytes, and YAML written from arbitrary
//! values (`lb_fuzz_control::FileSpec`); up to three more files are reloads of the first (or one of
//! them again: an edit undone). A first byte picks the deliveries of tables the data plane refuses
//! (`lb_fuzz_control::Sink`).
//! No panic; every rejection says why and is counted; a file is taken or refused whole (the running
//! tables stay, also when the data plane refuses them; see `lb_fuzz_control::drive`);
//! and a small file is judged in well under a second (the fuzzer's -timeout and
//! -rss_limit_mb catch a file that asks for a huge table or many of them and gets it).
//!
//! `seeds/config_file` holds inputs to start from (one: after a refused delivery, a file the same as
//! the last taken, which must be delivered again):
//! `cargo fuzz run --fuzz-dir fuzz-control -s none -O -a config_file fuzz-control/corpus/config_file
//! fuzz-control/seeds/config_file -- -dict=fuzz-control/dict/config_file.dict -timeout=2 -max_len=8192
//! -len_control=0`. `-len_control=0` lets inputs reach `-max_len` at once:
//! by default libFuzzer grows them slowly (357 bytes after 15 minutes), too short for most of what
//! `FileSpec` writes. `-a` (debug assertions) makes an overflow a crash rather than a wrapped value.
#![no_main]

use arbitrary::Arbitrary;
use lb_examples::config::file::parse;
use lb_examples::control::ControlInput;
use lb_fuzz_control::{FileSpec, drive, without_probes};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum File {
    Raw(Vec<u8>),
    Built(FileSpec),
}

impl File {
    fn text(&self) -> Option<String> {
        match self {
            // `load` reads the file as UTF-8 and refuses any other.
            File::Raw(bytes) => String::from_utf8(bytes.clone()).ok(),
            File::Built(spec) => spec.yaml(),
        }
    }
}

/// A reload: a new file, or an earlier one again (counted back from the last, 0 the last).
#[derive(Debug, Arbitrary)]
enum Reload {
    File(File),
    Again(u8),
}

fuzz_target!(|files: (u8, File, Vec<Reload>)| {
    let mut inputs = Vec::new();
    let mut texts = Vec::new();
    for reload in std::iter::once(&Reload::File(files.1)).chain(files.2.iter().take(3)) {
        let text = match reload {
            Reload::File(file) => file.text(),
            Reload::Again(back) => texts.iter().rev().nth(usize::from(*back) % texts.len().max(1)).cloned(),
        };
        let Some(text) = text else { continue };
        texts.push(text.clone());
        match parse(&text) {
            Ok(mut settings) => {
                // Every rejection names a field; an accepted file has the node's addresses filled in.
                settings.fill_from_env(|k| (k == "NODE_IPS").then(|| "192.168.1.10,fd00::10".to_string()));
                let _ = lb_examples::control::steering_for_config(&lb_core::config::Config {
                    node: settings.node.clone(),
                    services: settings.services.iter().map(|s| s.config.clone()).collect(),
                });
                inputs.push(ControlInput::File(Box::new(without_probes(settings))));
            }
            Err(e) => {
                let message = e.to_string();
                assert!(!message.is_empty());
                inputs.push(ControlInput::FileRejected(message));
            }
        }
    }
    drive(files.0, inputs);
});
