//! postfix fixture (being written).
