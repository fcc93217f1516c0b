//! Symbolic dims that are arithmetic of other dims. Optimum names the length of a decoder's
//! attention mask `past_sequence_length + sequence_length` and its `present.*` outputs the same:
//! such a dim has no size of its own to pin; it is sized from its terms.

/// One token of an expression: a dim name, an integer, or an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Name(String),
    Int(usize),
    Op(char),
}

/// A `dim_param` that is an expression of names and integers with `+ - * / %` (`/` floors,
/// `//` too, as Python writes it), the usual precedence and no parentheses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DimExpr {
    tokens: Vec<Token>,
}

impl DimExpr {
    /// The expression `param` spells, or None for a plain name (or anything else: a dim whose
    /// name is not arithmetic is pinned by that name).
    pub(crate) fn parse(param: &str) -> Option<DimExpr> {
        let mut tokens = vec![];
        let mut chars = param.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if "+-*/%".contains(c) {
                chars.next();
                if c == '/' && chars.peek() == Some(&'/') {
                    chars.next();
                }
                tokens.push(Token::Op(c));
            } else if c.is_ascii_digit() {
                let mut v = String::new();
                while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    v.push(d);
                    chars.next();
                }
                tokens.push(Token::Int(v.parse().ok()?));
            } else if c.is_alphabetic() || c == '_' {
                let mut v = String::new();
                while let Some(&d) = chars
                    .peek()
                    .filter(|d| d.is_alphanumeric() || **d == '_' || **d == '.')
                {
                    v.push(d);
                    chars.next();
                }
                tokens.push(Token::Name(v));
            } else {
                return None;
            }
        }
        // Operands and operators alternate, operands at both ends, at least one operator.
        let well_formed = tokens.len() >= 3
            && tokens.len() % 2 == 1
            && tokens
                .iter()
                .enumerate()
                .all(|(i, t)| matches!(t, Token::Op(_)) == (i % 2 == 1));
        well_formed.then_some(DimExpr { tokens })
    }

    /// The dim names the expression reads.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().filter_map(|t| match t {
            Token::Name(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Its value with each name sized by `size`; None while a name has no size, or when the
    /// result is not a size (negative, or a division by zero).
    pub(crate) fn eval(&self, size: impl Fn(&str) -> Option<usize>) -> Option<usize> {
        let operand = |t: &Token| match t {
            Token::Name(n) => size(n).map(|v| v as i64),
            Token::Int(v) => Some(*v as i64),
            Token::Op(_) => None,
        };
        // Sums of products: fold each run of * / % into a term, then add the terms.
        let (mut total, mut term, mut sign) = (0i64, operand(&self.tokens[0])?, 1i64);
        for pair in self.tokens[1..].chunks(2) {
            let (Token::Op(op), rhs) = (&pair[0], operand(&pair[1])?) else {
                return None;
            };
            match op {
                '*' => term = term.checked_mul(rhs)?,
                '/' => term = term.checked_div_euclid(rhs)?,
                '%' => term = term.checked_rem_euclid(rhs)?,
                _ => {
                    total = total.checked_add(sign * term)?;
                    (term, sign) = (rhs, if *op == '-' { -1 } else { 1 });
                }
            }
        }
        usize::try_from(total.checked_add(sign * term)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::DimExpr;

    fn eval(e: &str, dims: &[(&str, usize)]) -> Option<usize> {
        DimExpr::parse(e)?.eval(|n| dims.iter().find(|(k, _)| *k == n).map(|d| d.1))
    }

    #[test]
    fn optimum_dims_and_precedence() {
        let dims = [("past_sequence_length", 3), ("sequence_length", 5)];
        assert_eq!(
            eval("past_sequence_length + sequence_length", &dims),
            Some(8)
        );
        assert_eq!(eval("sequence_length - 1", &dims), Some(4));
        assert_eq!(eval("2 + sequence_length * 3 - 1", &dims), Some(16));
        assert_eq!(
            eval("sequence_length // 2 + sequence_length % 2", &dims),
            Some(3)
        );
        assert_eq!(eval("sequence_length / 2", &dims), Some(2));
        // Not yet sized, negative, or not a size at all.
        assert_eq!(eval("past_sequence_length + batch", &dims), None);
        assert_eq!(eval("past_sequence_length - sequence_length", &dims), None);
        assert_eq!(eval("sequence_length / 0", &dims), None);
        for plain in ["batch", "seq-len-", "a +", "+ a", "a + (b)", "", "a b"] {
            assert!(DimExpr::parse(plain).is_none(), "{plain}");
        }
        let e = DimExpr::parse("past_sequence_length + sequence_length").unwrap();
        assert_eq!(
            e.names().collect::<Vec<_>>(),
            ["past_sequence_length", "sequence_length"]
        );
    }
}
