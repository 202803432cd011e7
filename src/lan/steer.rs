//! TEMPORARY stub of the steering contract (replaced by the i8-steer branch).
#![allow(missing_docs, dead_code)]
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteerSpec {
    pub ifindex: u32,
    pub vip: Ipv4Addr,
    pub ports: Vec<RangeInclusive<u16>>,
    pub groups: Vec<Ipv4Addr>,
}
pub struct Steering;
pub const DEFAULT_TABLE: u32 = 6666;
pub const DEFAULT_PREF: u32 = 6600;
impl Steering {
    pub fn new(_table: u32, _pref: u32) -> std::io::Result<Self> {
        Ok(Steering)
    }
    pub fn apply(&mut self, _spec: Option<&SteerSpec>) -> std::io::Result<()> {
        Ok(())
    }
}
