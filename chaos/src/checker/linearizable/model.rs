//! The sequential specification every key is checked against: a register
//! of `Option<Value>`, absent at first, for `todc-utils`' [`WGLChecker`].
//!
//! An operation here is what the history recorded *and* what it returned:
//! the search applies the response's operation at the point it linearizes
//! it, so a read carries the value it observed and a compare-and-set its
//! [`CasOutcome`].
//!
//! Invariants:
//! - [`RegisterSpec::apply`] is total (it never panics) and leaves the state
//!   unchanged whenever it answers "not valid", as the trait asks.
//! - A compare-and-set is deterministic in the model: from state `s` it
//!   replaces iff `s == expect`. [`CasOutcome::Unobserved`] is that
//!   semantics without a recorded answer to match (an operation whose
//!   outcome is unknown), so it is valid in every state.
//! - There is no delete: once written, a key is never absent again.
//!
//! [`WGLChecker`]: todc_utils::WGLChecker

use todc_utils::Specification;

use crate::history::Value;

/// What a compare-and-set answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CasOutcome {
    /// It replaced the value: the state equalled `expect` at its point.
    Succeeded,
    /// It did not: the state differed from `expect` at its point.
    Failed,
    /// No answer came: it replaced iff the state equalled `expect`.
    Unobserved,
}

/// One operation on a register, with its recorded result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    /// A read that observed this (`None`: the key was absent).
    Read(Option<Value>),
    /// A write of this value.
    Write(Value),
    /// A compare-and-set from `expect` (`None`: absent) to `new`.
    Cas {
        /// The value the key had to hold.
        expect: Option<Value>,
        /// The value written if it did.
        new: Value,
        /// What it answered.
        outcome: CasOutcome,
    },
}

/// The register of `Option<Value>`, absent at first.
#[derive(Debug, Clone, Copy)]
pub struct RegisterSpec;

impl Specification for RegisterSpec {
    type State = Option<Value>;
    type Operation = RegisterOp;

    fn init() -> Self::State {
        None
    }

    fn apply(op: &Self::Operation, state: &Self::State) -> (bool, Self::State) {
        match *op {
            RegisterOp::Read(observed) => (observed == *state, *state),
            RegisterOp::Write(value) => (true, Some(value)),
            RegisterOp::Cas { expect, new, outcome } => {
                let matches = *state == expect;
                match outcome {
                    CasOutcome::Succeeded if matches => (true, Some(new)),
                    CasOutcome::Succeeded => (false, *state),
                    CasOutcome::Failed => (!matches, *state),
                    CasOutcome::Unobserved if matches => (true, Some(new)),
                    CasOutcome::Unobserved => (true, *state),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(op: RegisterOp, state: Option<Value>) -> (bool, Option<Value>) {
        RegisterSpec::apply(&op, &state)
    }

    #[test]
    fn reads_match_the_state_and_writes_set_it() {
        assert_eq!(RegisterSpec::init(), None);
        assert_eq!(apply(RegisterOp::Read(None), None), (true, None));
        assert_eq!(apply(RegisterOp::Read(Some(1)), None), (false, None));
        assert_eq!(apply(RegisterOp::Write(2), Some(1)), (true, Some(2)));
    }

    #[test]
    fn compare_and_set_outcomes() {
        let cas = |outcome| RegisterOp::Cas {
            expect: Some(1),
            new: 2,
            outcome,
        };
        assert_eq!(apply(cas(CasOutcome::Succeeded), Some(1)), (true, Some(2)));
        assert_eq!(apply(cas(CasOutcome::Succeeded), Some(3)), (false, Some(3)));
        assert_eq!(apply(cas(CasOutcome::Failed), Some(1)), (false, Some(1)));
        assert_eq!(apply(cas(CasOutcome::Failed), None), (true, None));
        assert_eq!(apply(cas(CasOutcome::Unobserved), Some(1)), (true, Some(2)));
        assert_eq!(apply(cas(CasOutcome::Unobserved), Some(3)), (true, Some(3)));
    }
}
