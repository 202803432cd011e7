//! Simulation tests of the one password authority: checks off the engine, one at a time; the
//! verifier with every member and the password with none; key-bound rejoin tokens.

use std::collections::HashSet;
use std::time::Duration;

use crate::ids::PartyId;
use crate::party::admission::{FRIEND_SLOTS, MAX_WAITING_CHECKS, PER_KEY};
use crate::party::engine::{Action, SavedParty};
use crate::party::password::{self, DEFAULT_KDF};
use crate::party::sim::*;
use crate::party::JoinError;
use crate::wire::{Credential, Message, Password, RejectReason};

const PW: &str = "s3cret horse";

/// A protected party of `n` nodes hosted by node 0, everyone joined with the password.
fn protected_party_of(n: usize) -> (Sim, PartyId) {
    let mut sim = Sim::new(n);
    let party = sim.create(0, Some(PW));
    for i in 1..n {
        assert_eq!(sim.join(i, 0, party, Some(PW)), Ok(()), "node {i} joins");
    }
    (sim, party)
}

/// What node `i` would write to state_dir, as the daemon writes it (JSON).
fn saved_json(sim: &Sim, i: usize) -> String {
    serde_json::to_string(sim.nodes[i].saved.as_ref().expect("something saved")).unwrap()
}

/// A join request with `credential` from node `from` to node `to`; what `to` sends back to
/// it (the engine's own actions are left for the sim).
fn request(
    sim: &mut Sim,
    from: usize,
    to: usize,
    party: PartyId,
    credential: Option<Credential>,
    nonce: u64,
) -> Vec<Message> {
    sim.inject(
        from,
        to,
        Message::JoinRequest {
            party,
            name: format!("n{from}"),
            credential,
            endpoints: vec![],
            previous_ip: None,
            nonce,
        },
    )
}

/// Join requests (with a password, with a token) that the nodes sent after the first
/// `since[i]` messages of node `i`.
fn credentials_sent_since(sim: &Sim, since: &[usize]) -> (usize, usize) {
    let mut counts = (0, 0);
    for (n, &from) in sim.nodes.iter().zip(since) {
        for (_, m) in &n.sent[from.min(n.sent.len())..] {
            match m {
                Message::JoinRequest {
                    credential: Some(Credential::Password(_)),
                    ..
                } => counts.0 += 1,
                Message::JoinRequest {
                    credential: Some(Credential::Token(_)),
                    ..
                } => counts.1 += 1,
                _ => {}
            }
        }
    }
    counts
}

fn sent_counts(sim: &Sim) -> Vec<usize> {
    sim.nodes.iter().map(|n| n.sent.len()).collect()
}

fn reject_reason(msgs: &[Message]) -> Option<RejectReason> {
    msgs.iter().find_map(|m| match m {
        Message::JoinReject { reason, .. } => Some(*reason),
        _ => None,
    })
}

/// The password is checked off the engine: the join is answered only once the check reports
/// back, a wrong password is refused then, and the right one gets in. (On the old engine the
/// check ran inline and the answer came at once.)
#[test]
fn passwords_are_checked_off_the_engine_and_answered_after() {
    let mut sim = Sim::new(2);
    let party = sim.create(0, Some(PW));
    sim.nodes[0].hold_checks = true;
    let now = sim.now;
    let target = sim.target(0);
    sim.nodes[1]
        .engine
        .join(now, party, vec![target.clone()], Some("wrong"))
        .unwrap();
    sim.settle();
    assert!(
        sim.nodes[1].finished.is_empty(),
        "answered before the check ran"
    );
    assert_eq!(sim.nodes[0].checks.len(), 1, "one check asked for");
    assert_eq!(sim.nodes[0].engine.pending_checks(), 1);
    // Retransmissions while the check runs start no second check.
    sim.advance(Duration::from_millis(900));
    assert_eq!(sim.nodes[0].checks.len(), 1);
    assert!(sim.nodes[1].finished.is_empty());
    sim.nodes[0].hold_checks = false;
    sim.settle();
    assert_eq!(
        sim.nodes[1].finished.pop(),
        Some(Err(JoinError::WrongPassword))
    );
    assert_eq!(sim.nodes[0].checks_run, 1);
    assert_eq!(sim.join(1, 0, party, Some(PW)), Ok(()));
    assert_eq!(sim.roster(0).members.len(), 2);
}

/// At most one check is outstanding; further ones wait in a bounded queue where strangers
/// cannot take the places kept for former members; what finds no room is dropped, uncharged,
/// and the joiner's retry gets in later. A check that never reports back is given up.
#[test]
fn one_check_at_a_time_and_a_bounded_queue() {
    let (mut sim, party) = protected_party_of(2);
    let friend = 1;
    let now = sim.now;
    sim.nodes[friend].engine.leave(now).unwrap(); // a former member: a friend
    sim.settle();
    sim.nodes[0].hold_checks = true;
    let strangers: Vec<usize> = (0..12).map(|_| sim.add_node()).collect();
    for &s in &strangers {
        let answer = request(
            &mut sim,
            s,
            0,
            party,
            Some(Credential::Password(Password::new("guess"))),
            1,
        );
        assert!(answer.is_empty(), "nothing is answered before its check");
    }
    assert_eq!(sim.nodes[0].checks.len(), 1, "one check outstanding");
    let stranger_places = MAX_WAITING_CHECKS - FRIEND_SLOTS;
    assert_eq!(sim.nodes[0].engine.pending_checks(), stranger_places);
    // The friend still finds a place.
    let answer = request(
        &mut sim,
        friend,
        0,
        party,
        Some(Credential::Password(Password::new(PW))),
        7,
    );
    assert!(answer.is_empty());
    assert_eq!(sim.nodes[0].engine.pending_checks(), stranger_places + 1);
    // Checks complete one at a time: each report starts exactly the next one.
    let mut answered = HashSet::new();
    while let Some(c) = sim.nodes[0].checks.pop_front() {
        assert!(sim.nodes[0].checks.is_empty(), "never two outstanding");
        let ok = password::check(&c.verifier, c.party, c.password.as_str());
        let now = sim.now;
        sim.nodes[0]
            .engine
            .handle_password_checked(now, c.ticket, ok);
        // A made-up or repeated ticket does nothing.
        sim.nodes[0]
            .engine
            .handle_password_checked(now, c.ticket, true);
        while let Some(a) = sim.nodes[0].engine.poll_action() {
            match a {
                Action::Send {
                    key,
                    msg: Message::JoinReject { reason, .. },
                    ..
                } => {
                    assert_eq!(reason, RejectReason::WrongPassword);
                    answered.insert(key);
                }
                Action::Send {
                    key,
                    msg: Message::JoinAccept { .. },
                    ..
                } => {
                    assert_eq!(key, sim.nodes[friend].key, "only the friend was right");
                    answered.insert(key);
                }
                Action::CheckPassword {
                    ticket,
                    verifier,
                    party,
                    password,
                } => sim.nodes[0]
                    .checks
                    .push_back(crate::party::sim::PasswordCheck {
                        ticket,
                        verifier,
                        party,
                        password,
                    }),
                _ => {}
            }
        }
    }
    assert_eq!(answered.len(), stranger_places + 1);
    assert_eq!(sim.nodes[0].engine.pending_checks(), 0);
    assert_eq!(sim.roster(0).members.len(), 2, "the friend is back in");
    // The strangers that found no room were not charged: each still has all its guesses.
    let dropped = strangers[stranger_places];
    sim.advance(Duration::from_secs(2));
    sim.nodes[0].hold_checks = false;
    for n in 0..PER_KEY {
        let answer = request(
            &mut sim,
            dropped,
            0,
            party,
            Some(Credential::Password(Password::new("guess"))),
            100 + u64::from(n),
        );
        let _ = answer;
    }
    let sent_back: Vec<RejectReason> = sim.nodes[0]
        .sent
        .iter()
        .filter(|(to, _)| *to == sim.nodes[dropped].addr)
        .filter_map(|(_, m)| match m {
            Message::JoinReject { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent_back,
        vec![RejectReason::WrongPassword; PER_KEY as usize],
        "all its guesses were still there"
    );
    // A check that never reports back is given up and the next one runs.
    sim.nodes[0].hold_checks = true;
    let late = sim.add_node();
    request(
        &mut sim,
        late,
        0,
        party,
        Some(Credential::Password(Password::new("x"))),
        1,
    );
    assert_eq!(sim.nodes[0].engine.pending_checks(), 1);
    sim.nodes[0].checks.clear(); // the check thread died
    sim.advance(crate::party::admission::CHECK_TIMEOUT + Duration::from_secs(1));
    assert_eq!(sim.nodes[0].engine.pending_checks(), 0, "given up");
    sim.nodes[0].hold_checks = false;
    assert_eq!(sim.join(late, 0, party, Some(PW)), Ok(()));
}

/// The host's argon2id verifier reaches every member (so a successor can check passwords),
/// and nobody keeps the password: not in state_dir, and a successor host checks a newcomer's
/// password with the verifier alone.
#[test]
fn the_verifier_reaches_members_and_nobody_keeps_the_password() {
    let (mut sim, party) = protected_party_of(3);
    let verifier = sim.roster(0).verifier.clone().expect("protected");
    assert_eq!(verifier.kdf, DEFAULT_KDF);
    for i in 0..3 {
        assert_eq!(sim.roster(i).verifier.as_ref(), Some(&verifier), "node {i}");
        let saved = saved_json(&sim, i);
        assert!(!saved.contains(PW), "node {i} saved the password: {saved}");
        assert!(sim.nodes[i].saved.as_ref().unwrap().token.is_some());
    }
    // The host goes; its successor admits a newcomer with the password, refuses a wrong one.
    let now = sim.now;
    sim.nodes[0].engine.leave(now).unwrap();
    sim.settle();
    assert_eq!(sim.roster(1).host, sim.nodes[1].engine.id());
    let newcomer = sim.add_node();
    assert_eq!(
        sim.join(newcomer, 1, party, Some("nope")),
        Err(JoinError::WrongPassword)
    );
    assert_eq!(sim.join(newcomer, 1, party, Some(PW)), Ok(()));
    assert_eq!(sim.nodes[1].checks_run, 2, "checked by the successor");
    assert!(!saved_json(&sim, newcomer).contains(PW));
}

/// A restarted member rejoins with its token: no password on disk, no argon2 check on the host.
#[test]
fn a_restarted_member_rejoins_with_its_token() {
    let (mut sim, _) = protected_party_of(3);
    let saved: SavedParty = sim.nodes[2].saved.clone().unwrap();
    assert!(!saved_json(&sim, 2).contains(PW));
    let checks_before = sim.nodes[0].checks_run;
    sim.nodes[2].up = false;
    sim.advance(TIMEOUT + Duration::from_secs(2));
    assert_eq!(sim.roster(0).members.len(), 2);
    sim.restart(2);
    let now = sim.now;
    sim.nodes[2].engine.rejoin(now, saved).unwrap();
    sim.settle();
    sim.advance(Duration::from_millis(500));
    assert_eq!(sim.nodes[2].finished.pop(), Some(Ok(())));
    assert_eq!(sim.nodes[2].address, Some(ip(3)));
    assert_eq!(sim.roster(0).members.len(), 3);
    assert_eq!(sim.nodes[0].checks_run, checks_before, "no password check");
}

/// After the host crashed, a restarted member and the restarted former host rejoin the
/// successor with their tokens (the successor holds the same verifier).
#[test]
fn tokens_get_members_back_in_with_a_successor_host() {
    let (mut sim, _) = protected_party_of(3);
    let saved: Vec<SavedParty> = (0..3)
        .map(|i| sim.nodes[i].saved.clone().unwrap())
        .collect();
    for i in 0..3 {
        assert!(!saved_json(&sim, i).contains(PW), "node {i}");
    }
    let sent_before = sent_counts(&sim);
    sim.nodes[0].up = false;
    sim.nodes[2].up = false;
    sim.advance(TIMEOUT + Duration::from_secs(2));
    assert_eq!(sim.roster(1).host, sim.nodes[1].engine.id());
    assert_eq!(sim.roster(1).members.len(), 1);
    for i in [2, 0] {
        sim.restart(i);
        let now = sim.now;
        sim.nodes[i].engine.rejoin(now, saved[i].clone()).unwrap();
        sim.settle();
        sim.advance(Duration::from_secs(1));
        assert_eq!(sim.nodes[i].finished.pop(), Some(Ok(())), "node {i}");
    }
    sim.assert_one_party(&[0, 1, 2], "everyone back");
    assert_eq!(sim.roster(0).host, sim.nodes[1].engine.id());
    assert_eq!(sim.nodes[1].checks_run, 0, "tokens only, no password check");
    let (passwords, tokens) = credentials_sent_since(&sim, &sent_before);
    assert_eq!(passwords, 0, "no password sent");
    assert!(tokens > 0, "they rejoined with tokens");
}

/// What a member keeps to get back in is worthless to another key: a stranger presenting it
/// is refused like a wrong password, and such guesses spend the budgets. (On the old engine a
/// member kept the password, which let any key in.)
#[test]
fn a_members_saved_credential_is_useless_to_another_key() {
    let (mut sim, party) = protected_party_of(3);
    let saved = sim.nodes[2].saved.clone().unwrap();
    let stolen = match (saved.token, saved.legacy_password) {
        (Some(t), _) => Credential::Token(t),
        (None, Some(p)) => Credential::Password(p),
        (None, None) => panic!("nothing saved to get back in with"),
    };
    let thief = sim.add_node();
    let mut answers = Vec::new();
    for n in 0..(PER_KEY + 1) {
        let got = request(
            &mut sim,
            thief,
            0,
            party,
            Some(stolen.clone()),
            50 + u64::from(n),
        );
        answers.extend(reject_reason(&got));
        // (A password would be checked off the engine: its answer arrives with the check.)
        let before = sim.nodes[0].sent.len();
        sim.run_checks();
        sim.settle();
        let thief_at = sim.nodes[thief].addr;
        answers.extend(
            sim.nodes[0].sent[before..]
                .iter()
                .filter_map(|(to, m)| match m {
                    Message::JoinReject { reason, .. } if *to == thief_at => Some(*reason),
                    _ => None,
                }),
        );
    }
    assert!(!sim
        .roster(0)
        .members
        .iter()
        .any(|m| m.key == sim.nodes[thief].key));
    let mut want = vec![RejectReason::WrongPassword; PER_KEY as usize];
    want.push(RejectReason::TooManyAttempts);
    assert_eq!(answers, want);
    // The owner still gets in with it.
    let owner = request(&mut sim, 2, 0, party, Some(stolen), 99);
    assert!(
        owner
            .iter()
            .any(|m| matches!(m, Message::JoinAccept { .. })),
        "{owner:?}"
    );
}

/// A state file written by lanrage protocol 2 (a member's: it kept the password) still
/// loads; the password serves one rejoin and is gone from the next save.
#[test]
fn an_old_saved_party_with_a_password_loads_and_the_password_goes() {
    let (mut sim, party) = protected_party_of(3);
    let mut saved = sim.nodes[2].saved.clone().unwrap();
    saved.token = None;
    let mut old = serde_json::to_value(&saved).unwrap();
    old.as_object_mut().unwrap().remove("token");
    old["password"] = PW.into();
    let old: SavedParty = serde_json::from_value(old).expect("the old file loads");
    assert!(old.legacy_password.is_some());
    sim.restart(2);
    let now = sim.now;
    sim.nodes[2].engine.rejoin(now, old).unwrap();
    sim.settle();
    sim.advance(TIMEOUT + Duration::from_secs(2));
    assert_eq!(sim.nodes[2].finished.pop(), Some(Ok(())));
    assert_eq!(sim.roster(0).party, party);
    let json = saved_json(&sim, 2);
    assert!(!json.contains(PW) && !json.contains("password"), "{json}");
    assert!(sim.nodes[2].saved.as_ref().unwrap().token.is_some());
}

/// A host's state file of protocol 2 (a BLAKE2s verifier, the password beside it) still
/// loads: the party comes back protected by an argon2id verifier made from the saved password,
/// and the password is gone from the next save.
#[test]
fn an_old_hosts_file_comes_back_protected() {
    let (sim, party) = protected_party_of(1);
    let saved = sim.nodes[0].saved.clone().unwrap();
    let mut old = serde_json::to_value(&saved).unwrap();
    old.as_object_mut().unwrap().remove("token");
    old["password"] = PW.into();
    let (salt, hash) = ([1u8; 16], [2u8; 32]);
    old["hosted"]["verifier"] = serde_json::json!({ "salt": salt, "hash": hash });
    let old: SavedParty = serde_json::from_value(old).expect("the old file loads");
    assert!(old.hosted.as_ref().unwrap().legacy_verifier);
    let mut sim = Sim::new(2);
    let now = sim.now;
    sim.nodes[0].engine.rejoin(now, old.clone()).unwrap();
    sim.settle();
    assert_eq!(sim.roster(0).party, party);
    let v = sim.roster(0).verifier.expect("still protected");
    assert_eq!(v.kdf, DEFAULT_KDF);
    assert!(!saved_json(&sim, 0).contains(PW));
    assert_eq!(
        sim.join(1, 0, party, Some("nope")),
        Err(JoinError::WrongPassword)
    );
    assert_eq!(sim.join(1, 0, party, Some(PW)), Ok(()));
    // Without the password beside it, an old verifier cannot be trusted to protect anything:
    // the party is not brought back open.
    let mut no_pw = old;
    no_pw.legacy_password = None;
    let mut sim = Sim::new(1);
    let now = sim.now;
    sim.nodes[0].engine.rejoin(now, no_pw).unwrap();
    sim.settle();
    assert!(!sim.in_party(0));
}

/// After a split, the host that yields moves itself and its members to the other host with
/// their tokens: the party heals without any password check.
#[test]
fn a_protected_split_heals_with_tokens() {
    let (mut sim, _) = {
        let mut sim = Sim::new(4);
        let party = sim.create(0, Some(PW));
        for i in 1..4 {
            assert_eq!(sim.join(i, 0, party, Some(PW)), Ok(()));
        }
        (sim, party)
    };
    sim.groups = vec![0, 1, 1, 0];
    sim.advance(TIMEOUT + Duration::from_secs(1));
    assert_eq!(sim.roster(1).host, sim.nodes[1].engine.id());
    let runs: Vec<usize> = sim.nodes.iter().map(|n| n.checks_run).collect();
    let sent_before = sent_counts(&sim);
    sim.groups = vec![0; 64];
    sim.advance(TIMEOUT * 3);
    sim.assert_one_party(&[0, 1, 2, 3], "healed");
    let (passwords, tokens) = credentials_sent_since(&sim, &sent_before);
    assert_eq!(passwords, 0, "no password sent");
    assert!(tokens > 0, "they moved with tokens");
    let after: Vec<usize> = sim.nodes.iter().map(|n| n.checks_run).collect();
    assert_eq!(runs, after, "no password was checked to heal");
}
