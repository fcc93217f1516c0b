//! One optimizer step's record, the line type of `metrics.jsonl`.

use serde::{Deserialize, Serialize};

/// One optimizer step's record.
///
/// Non-finite numbers (a diverged loss is worth logging, not crashing over) are written as the
/// strings `"NaN"`, `"inf"` and `"-inf"`, because JSON has no literal for them and serde_json
/// would otherwise write `null` and then refuse to read it back into an `f64`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// 0-based index of the optimizer step (see the module docs).
    pub step: usize,
    pub epoch: usize,
    #[serde(with = "json_f64")]
    pub loss: f64,
    #[serde(with = "json_f64")]
    pub lr: f64,
    /// Global gradient norm, when the step program computes it.
    #[serde(with = "json_opt_f64", default)]
    pub grad_norm: Option<f64>,
    /// Seconds since the run (this process) started.
    #[serde(with = "json_f64")]
    pub elapsed_s: f64,
    /// The evaluation after this step, when one ran (`--eval-data`, every `--eval-every`).
    #[serde(
        with = "json_opt_f64",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_loss: Option<f64>,
    /// Its accuracy (classification and `lm` losses; see `train::eval`).
    #[serde(
        with = "json_opt_f64",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_accuracy: Option<f64>,
}

/// Reads a float written by [`json_f64`]: a number, one of the non-finite strings, or `null`
/// (`None`; what serde_json writes for a non-finite `f64` by default).
struct FloatVisitor;

impl<'de> serde::de::Visitor<'de> for FloatVisitor {
    type Value = Option<f64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, null, or one of \"NaN\", \"inf\", \"-inf\"")
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        match v {
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            "inf" | "+inf" | "Infinity" => Ok(Some(f64::INFINITY)),
            "-inf" | "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
        }
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(FloatVisitor)
    }
}

/// `f64` fields that may be non-finite: numbers as numbers, the rest as strings.
mod json_f64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    /// `null` reads as NaN: an unknown value, not an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(d.deserialize_any(super::FloatVisitor)?.unwrap_or(f64::NAN))
    }
}

/// `Option<f64>` fields: `None` is `null`, `Some` as [`json_f64`].
mod json_opt_f64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => super::json_f64::serialize(x, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(super::FloatVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::rec;
    use super::*;

    #[test]
    fn records_round_trip_including_non_finite_values() {
        let mut r = rec(3, f64::NAN);
        r.grad_norm = Some(f64::INFINITY);
        r.lr = f64::NEG_INFINITY;
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""loss":"NaN""#), "{line}");
        let back: StepRecord = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.grad_norm, Some(f64::INFINITY));
        assert_eq!(back.lr, f64::NEG_INFINITY);
        // null (serde_json's default for non-finite) reads as NaN; a missing grad_norm as None;
        // integers are numbers too.
        let r2: StepRecord =
            serde_json::from_str(r#"{"step":1,"epoch":0,"loss":null,"lr":1,"elapsed_s":0.5}"#)
                .unwrap();
        assert!(r2.loss.is_nan());
        assert_eq!(r2.lr, 1.0);
        assert_eq!(r2.grad_norm, None);
        let fine = rec(4, 0.25);
        let back: StepRecord =
            serde_json::from_str(&serde_json::to_string(&fine).unwrap()).unwrap();
        assert_eq!(back, fine);
        assert!(serde_json::from_str::<StepRecord>(
            r#"{"step":1,"epoch":0,"loss":"lots","lr":1,"elapsed_s":0.5}"#
        )
        .is_err());
    }

    #[test]
    fn eval_fields_are_written_only_when_present() {
        let plain = serde_json::to_string(&rec(2, 0.5)).unwrap();
        assert!(!plain.contains("eval"), "{plain}");
        let mut r = rec(2, 0.5);
        r.eval_loss = Some(0.75);
        r.eval_accuracy = Some(0.625);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""eval_loss":0.75"#), "{line}");
        let back: StepRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
