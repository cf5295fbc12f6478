//! The control API seen from its callers: [`peer`], the async client a
//! node uses to call other nodes. (The CLI's blocking client is
//! `crate::api_client`; the server is `crate::node::api`.)

pub mod peer;
pub mod types;
