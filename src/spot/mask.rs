//! Bit-packed parameter masks.

use serde::{Deserialize, Serialize};

/// A set of element indices of one tensor, packed LSB-first into bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    pub len: usize,
    pub bits: Vec<u8>,
}

impl Mask {
    pub fn empty(len: usize) -> Self {
        Self {
            len,
            bits: vec![0; len.div_ceil(8)],
        }
    }
    pub fn from_indices(len: usize, idx: &[usize]) -> Self {
        let mut m = Self::empty(len);
        for &i in idx {
            m.set(i);
        }
        m
    }
    pub fn set(&mut self, i: usize) {
        self.bits[i / 8] |= 1 << (i % 8);
    }
    pub fn get(&self, i: usize) -> bool {
        self.bits[i / 8] >> (i % 8) & 1 == 1
    }
    pub fn count(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
    /// (|A ∩ B|, |A ∪ B|)
    pub fn inter_union(&self, o: &Mask) -> (usize, usize) {
        self.bits.iter().zip(&o.bits).fold((0, 0), |(i, u), (a, b)| {
            (i + (a & b).count_ones() as usize, u + (a | b).count_ones() as usize)
        })
    }
    /// Elements in `self` but not in `o`.
    pub fn minus(&self, o: &Mask) -> Mask {
        Mask {
            len: self.len,
            bits: self.bits.iter().zip(&o.bits).map(|(a, b)| a & !b).collect(),
        }
    }
    pub fn union(&self, o: &Mask) -> Mask {
        Mask {
            len: self.len,
            bits: self.bits.iter().zip(&o.bits).map(|(a, b)| a | b).collect(),
        }
    }
}
