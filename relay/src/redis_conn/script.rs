//! Calls of the relay's Redis scripts with their KEYS/ARGV layout named.
//!
//! Each script (a `.lua` file beside its Rust module) reads its keys and
//! arguments by position; its [`Layout`] names those positions in the same order
//! as the file's header comment, and [`Call`] pushes values by name, so that a
//! key or argument out of place fails the tests (debug builds check every push)
//! instead of reaching Redis.

use redis::{Pipeline, Script, ScriptInvocation, ToRedisArgs};

/// The names of a script's KEYS and ARGV in the order the script reads them. A
/// name ending in `..` is a list (or a repeated group): it takes every push of
/// that name, none or many, until a push of the name after it.
#[derive(Debug)]
pub struct Layout {
    pub keys: &'static [&'static str],
    pub args: &'static [&'static str],
}

impl Layout {
    /// Number of keys before the first list.
    pub const fn fixed_keys(&self) -> usize {
        let mut n = 0;
        while n < self.keys.len() && !ends_with_dots(self.keys[n]) {
            n += 1;
        }
        n
    }

    /// Number of arguments before the first list.
    pub const fn fixed_args(&self) -> usize {
        let mut n = 0;
        while n < self.args.len() && !ends_with_dots(self.args[n]) {
            n += 1;
        }
        n
    }
}

const fn ends_with_dots(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2 && b[b.len() - 1] == b'.' && b[b.len() - 2] == b'.'
}

/// Checks that `name` is what may come at `at` among `names`; returns the next
/// place.
fn next(names: &[&str], mut at: usize, name: &str, what: &str) -> usize {
    loop {
        match names.get(at) {
            Some(n) if *n == name => return if ends_with_dots(n) { at } else { at + 1 },
            // A list may end (or be empty): the push may be the name after it.
            Some(n) if ends_with_dots(n) => at += 1,
            other => panic!("script {what} {name:?} pushed where the layout has {other:?}"),
        }
    }
}

/// Whether everything from `at` on may be left out (lists only).
fn complete(names: &[&str], at: usize) -> bool {
    names
        .get(at..)
        .unwrap_or_default()
        .iter()
        .all(|n| ends_with_dots(n))
}

enum Target<'a, 's> {
    Invocation(ScriptInvocation<'s>),
    Pipeline(&'a mut Pipeline),
}

/// A script call under construction: keys and arguments pushed by name.
pub struct Call<'a, 's> {
    layout: &'static Layout,
    target: Target<'a, 's>,
    key_at: usize,
    arg_at: usize,
}

impl<'s> Call<'static, 's> {
    /// An `EVALSHA` of `script` (see [`Call::invocation`]).
    pub fn new(script: &'s Script, layout: &'static Layout) -> Self {
        Call {
            layout,
            target: Target::Invocation(script.prepare_invoke()),
            key_at: 0,
            arg_at: 0,
        }
    }

    /// The invocation, once every key and argument is in.
    pub fn invocation(self) -> ScriptInvocation<'s> {
        self.finished();
        match self.target {
            Target::Invocation(i) => i,
            Target::Pipeline(_) => unreachable!("built with Call::new"),
        }
    }
}

impl<'a> Call<'a, 'static> {
    /// Pushes onto the last command of `pipe`, an `EVALSHA <hash> <numkeys>`
    /// whose keys and arguments follow.
    pub fn onto(pipe: &'a mut Pipeline, layout: &'static Layout) -> Self {
        Call {
            layout,
            target: Target::Pipeline(pipe),
            key_at: 0,
            arg_at: 0,
        }
    }

    /// Ends a call made with [`Call::onto`].
    pub fn done(self) {
        self.finished();
    }
}

impl Call<'_, '_> {
    pub fn key<T: ToRedisArgs>(&mut self, name: &'static str, value: T) -> &mut Self {
        if cfg!(debug_assertions) {
            self.key_at = next(self.layout.keys, self.key_at, name, "key");
        }
        match &mut self.target {
            Target::Invocation(i) => {
                i.key(value);
            }
            Target::Pipeline(p) => {
                p.arg(value);
            }
        }
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, name: &'static str, value: T) -> &mut Self {
        if cfg!(debug_assertions) {
            self.arg_at = next(self.layout.args, self.arg_at, name, "argument");
        }
        match &mut self.target {
            Target::Invocation(i) => {
                i.arg(value);
            }
            Target::Pipeline(p) => {
                p.arg(value);
            }
        }
        self
    }

    fn finished(&self) {
        if cfg!(debug_assertions) {
            let (keys, args) = (self.layout.keys, self.layout.args);
            assert!(
                complete(keys, self.key_at) && complete(args, self.arg_at),
                "script call ended after {} of the keys {keys:?} and {} of the arguments {args:?}",
                self.key_at,
                self.arg_at
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        keys: &["a", "rest.."],
        args: &["x", "pairs..", "y"],
    };

    #[test]
    fn pushes_in_layout_order() {
        let script = Script::new("return 1");
        let mut c = Call::new(&script, &L);
        c.key("a", "k1").key("rest..", "k2").key("rest..", "k3");
        c.arg("x", 1)
            .arg("pairs..", 2)
            .arg("pairs..", 3)
            .arg("y", "two");
        c.invocation();
        // Lists may be empty.
        let mut c = Call::new(&script, &L);
        c.key("a", "k1").arg("x", 1).arg("y", 2);
        c.invocation();
        assert_eq!((L.fixed_keys(), L.fixed_args()), (1, 1));
    }

    #[test]
    #[should_panic(expected = "pushed where the layout has")]
    fn a_push_out_of_place_fails() {
        let script = Script::new("return 1");
        let mut c = Call::new(&script, &L);
        c.arg("x", 1).arg("y", 2).arg("x", 3);
    }

    #[test]
    #[should_panic(expected = "script call ended after")]
    fn a_missing_argument_fails() {
        let script = Script::new("return 1");
        let mut c = Call::new(&script, &L);
        c.key("a", "k").arg("x", 1);
        c.invocation();
    }
}
