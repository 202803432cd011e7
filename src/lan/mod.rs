//! Making the party look like one LAN to games: broadcast and multicast across the party.

pub mod steer;
