//! Network control for processes (`docs/PROTOCOL.md` section 10).

/// Whether `process/start` honours `networkProxy` (the
/// `networkProxyLaunch` capability).
pub const PROXY_LAUNCH: bool = false;
