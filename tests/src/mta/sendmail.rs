//! sendmail fixture (being written).
