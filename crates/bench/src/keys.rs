//! Which key each request touches, and what it writes.
//!
//! etcd's benchmark writes `key-size` bytes holding a varint of the key's index, which makes keys
//! unprintable and lets a key space wider than the key size collide silently. Here a key is the
//! index in decimal, zero-padded to `key-size` bytes (`00000042`): same length on the wire, readable
//! with `etcdctl get`, and a key space that does not fit is refused up front.

use bytes::Bytes;

use crate::BenchError;

/// Maps request numbers to keys: `key_space_size` distinct keys of `key_size` bytes each.
#[derive(Clone, Debug)]
pub struct KeyGen {
    key_size: usize,
    key_space_size: u64,
    sequential: bool,
}

impl KeyGen {
    /// A generator of `key_space_size` keys of `key_size` bytes; `sequential` walks the key space
    /// in order (request `i` gets key `i % key_space_size`), otherwise keys are drawn uniformly.
    ///
    /// Fails when the key space is empty or its largest index needs more than `key_size` digits.
    pub fn new(key_size: usize, key_space_size: u64, sequential: bool) -> Result<Self, BenchError> {
        if key_space_size == 0 {
            return Err(BenchError::InvalidArgs(
                "--key-space-size must be at least 1".into(),
            ));
        }
        let needed = digits(key_space_size - 1);
        if key_size < needed {
            return Err(BenchError::InvalidArgs(format!(
                "--key-size {key_size} is too small for --key-space-size {key_space_size}: keys are \
                 zero-padded decimal indexes and need at least {needed} bytes"
            )));
        }
        Ok(KeyGen {
            key_size,
            key_space_size,
            sequential,
        })
    }

    /// How many distinct keys there are.
    pub fn key_space_size(&self) -> u64 {
        self.key_space_size
    }

    /// The same keys, walked in order.
    pub fn sequential(&self) -> KeyGen {
        KeyGen {
            sequential: true,
            ..self.clone()
        }
    }

    /// The key index request number `request` uses.
    pub fn index(&self, request: u64, rng: &mut fastrand::Rng) -> u64 {
        if self.sequential {
            request % self.key_space_size
        } else {
            rng.u64(0..self.key_space_size)
        }
    }

    /// The key with index `index` (taken modulo the key space).
    pub fn key(&self, index: u64) -> Bytes {
        let index = index % self.key_space_size;
        Bytes::from(format!("{index:0width$}", width = self.key_size))
    }
}

/// Number of decimal digits of `n` (1 for 0).
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// A value of `size` printable bytes, drawn once: every put writes the same value, as in etcd's
/// benchmark, so the client spends no time making values.
pub fn value(size: usize, rng: &mut fastrand::Rng) -> Bytes {
    (0..size).map(|_| rng.alphanumeric() as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_zero_padded_decimal_of_key_size() {
        let g = KeyGen::new(8, 1000, true).unwrap();
        assert_eq!(g.key(0), Bytes::from_static(b"00000000"));
        assert_eq!(g.key(42), Bytes::from_static(b"00000042"));
        assert_eq!(g.key(999), Bytes::from_static(b"00000999"));
        assert_eq!(g.key(1000), g.key(0), "indexes wrap around the key space");
    }

    #[test]
    fn sequential_walks_the_key_space_in_order() {
        let g = KeyGen::new(3, 5, true).unwrap();
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<u64> = (0..12).map(|i| g.index(i, &mut rng)).collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn random_keys_stay_in_the_key_space_and_cover_it() {
        let g = KeyGen::new(2, 10, false).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = [false; 10];
        for i in 0..1000 {
            let idx = g.index(i, &mut rng);
            assert!(idx < 10);
            seen[idx as usize] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "1000 draws over 10 keys hit each: {seen:?}"
        );
    }

    #[test]
    fn key_space_of_one_is_always_the_same_key() {
        let g = KeyGen::new(8, 1, false).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        assert!((0..100).all(|i| g.index(i, &mut rng) == 0));
    }

    #[test]
    fn key_space_must_fit_the_key_size() {
        assert!(
            KeyGen::new(2, 100, true).is_ok(),
            "indexes 0..=99 fit in 2 bytes"
        );
        assert!(
            KeyGen::new(2, 101, true).is_err(),
            "index 100 needs 3 bytes"
        );
        assert!(KeyGen::new(0, 1, true).is_err());
        assert!(KeyGen::new(8, 0, true).is_err());
        assert!(KeyGen::new(20, u64::MAX, true).is_ok());
    }

    #[test]
    fn digits_counts_decimal_digits() {
        assert_eq!(digits(0), 1);
        assert_eq!(digits(9), 1);
        assert_eq!(digits(10), 2);
        assert_eq!(digits(99_999), 5);
        assert_eq!(digits(u64::MAX), 20);
    }

    #[test]
    fn value_has_the_asked_size_and_is_printable() {
        let mut rng = fastrand::Rng::with_seed(5);
        let v = value(64, &mut rng);
        assert_eq!(v.len(), 64);
        assert!(v.iter().all(u8::is_ascii_alphanumeric));
        assert!(value(0, &mut rng).is_empty());
    }
}
