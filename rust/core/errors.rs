//! The one error type of the core. The Python layer maps it to `ValueError` / `TypeError`.

use std::fmt;

/// Which Python exception an error becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wrong value (shape, range, non-finite number, unknown option) -> `ValueError`.
    Value,
    /// Wrong type (dtype, object kind) -> `TypeError`.
    Type,
}

/// An input error naming the offending argument and, where there is one, the first bad index.
#[derive(Debug, Clone, PartialEq)]
pub struct RloxError {
    pub kind: ErrorKind,
    pub field: String,
    pub index: Option<usize>,
    pub message: String,
}

impl RloxError {
    pub fn value(field: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Value,
            field: field.to_owned(),
            index: None,
            message: message.into(),
        }
    }

    pub fn type_error(field: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Type,
            field: field.to_owned(),
            index: None,
            message: message.into(),
        }
    }

    /// A value error at a given position (pair or row index) of `field`.
    pub fn at(field: &str, index: usize, message: impl Into<String>) -> Self {
        Self {
            index: Some(index),
            ..Self::value(field, message)
        }
    }
}

impl fmt::Display for RloxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}[{}]: {}", self.field, i, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for RloxError {}

pub type Result<T> = std::result::Result<T, RloxError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_field_and_index() {
        let e = RloxError::at("chosen", 3, "empty completion");
        assert_eq!(e.to_string(), "chosen[3]: empty completion");
        assert_eq!(e.kind, ErrorKind::Value);
        let t = RloxError::type_error("beta", "expected a float");
        assert_eq!(t.to_string(), "beta: expected a float");
        assert_eq!(t.kind, ErrorKind::Type);
    }
}
