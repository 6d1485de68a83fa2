//! exim fixture (being written).
