pub mod frontend;
