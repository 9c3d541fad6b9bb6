//! The WebAssembly shell around [`crate::core`]. All the conversion between WIT and core types
//! is `esi_plugin_sdk`'s; this only names the component and its entry point.

esi_plugin_sdk::export_plugin!(VlanPoolWorker, crate::core::HANDLER, crate::core::handle);
