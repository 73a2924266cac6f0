//! Cost of one Ed25519 signature over a DKIM-sized input (~380 octets: the signed
//! header block), ring vs ed25519-dalek: `ed25519_sign ring|dalek|none N` signs N
//! times. Instructions: run under callgrind with two N and subtract; time: task-clock.
use std::hint::black_box;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (which, n) = match args.as_slice() {
        [_, w, n] => (w.as_str(), n.parse::<usize>().expect("N")),
        _ => {
            eprintln!("usage: ed25519_sign ring|dalek|none N");
            std::process::exit(2);
        }
    };
    let seed = [7u8; 32];
    let msg = vec![b'h'; 380];
    let ring_key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
    let dalek_key = ed25519_dalek::SigningKey::from_bytes(&seed);
    // Ed25519 is deterministic: both must give the same signature.
    {
        use ed25519_dalek::Signer;
        assert_eq!(ring_key.sign(&msg).as_ref(), &dalek_key.sign(&msg).to_bytes()[..]);
    }
    let mut acc = 0u8;
    for i in 0..n {
        let mut m = msg.clone();
        m[0] = i as u8;
        acc ^= match which {
            "ring" => ring_key.sign(black_box(&m)).as_ref()[0],
            "dalek" => {
                use ed25519_dalek::Signer;
                dalek_key.sign(black_box(&m)).to_bytes()[0]
            }
            _ => m[1],
        };
    }
    println!("{acc}");
}
