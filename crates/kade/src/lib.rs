//! kade
